// Against a running gateway (FLYWHEEL_GATEWAY_URL): the `openai` npm package asks for the role `coder`, whole and
// streamed; then this package's client posts feedback and an outcome against the response ids, and a bad body is
// refused naming its field. Prints one JSON line for the Python test that drives it (tests/test_gateway_clients.py).
import assert from "node:assert/strict";
import OpenAI from "openai";
import { FlywheelClient, FlywheelError } from "../dist/index.js";

const baseURL = process.env.FLYWHEEL_GATEWAY_URL;
assert.ok(baseURL, "set FLYWHEEL_GATEWAY_URL to the gateway's base URL (.../v1)");
const prompt = process.env.FLYWHEEL_PROMPT ?? "Write a Python function that adds two numbers.";
const openai = new OpenAI({ baseURL, apiKey: process.env.FLYWHEEL_API_KEY ?? "unused", maxRetries: 0 });
const messages = [{ role: "user", content: prompt }];

const whole = await openai.chat.completions.create({ model: "coder", messages, max_tokens: 12, temperature: 0 });
const stream = await openai.chat.completions.create({ model: "coder", messages, max_tokens: 12, temperature: 0,
                                                      stream: true });
let streamed = "";
let streamedId = null;
for await (const chunk of stream) {
  streamedId ??= chunk.id;
  streamed += chunk.choices[0]?.delta?.content ?? "";
}
assert.equal(streamed, whole.choices[0].message.content);

const flywheel = new FlywheelClient({ baseURL, apiKey: process.env.FLYWHEEL_API_KEY });
const feedback = await flywheel.feedback({ interaction_id: whole.id, rating: 4, implicit: "accepted" });
const outcome = await flywheel.outcome({ interaction_id: streamedId, compiles: true, tests_passed: 2,
                                         tests_failed: 0 });
let refused = null;
try {
  await flywheel.feedback({ interaction_id: whole.id, rating: 9 });
} catch (error) {
  assert.ok(error instanceof FlywheelError);
  refused = { status: error.status, param: error.param, message: error.message };
}
assert.ok(refused, "a rating of 9 must be refused");
console.log(JSON.stringify({ whole: whole.choices[0].message.content, whole_id: whole.id, streamed,
                             streamed_id: streamedId, feedback_id: feedback.id, outcome_id: outcome.id, refused }));
