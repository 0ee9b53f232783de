/**
 * Post outcomes and feedback to a Flywheel gateway, keyed by the response id the gateway answered with.
 *
 * An agent calls the gateway with any OpenAI or Anthropic client (only its base URL changes); every answer's `id`
 * is the interaction id. This client reports what happened to that answer:
 *
 *   const flywheel = new FlywheelClient({ baseURL: "http://127.0.0.1:8787/v1", apiKey });
 *   await flywheel.outcome({ interaction_id: completion.id, compiles: true, tests_passed: 4, tests_failed: 1 });
 *   await flywheel.feedback({ interaction_id: completion.id, rating: 5, implicit: "accepted" });
 *
 * The body types are generated from Flywheel's JSON Schema (`npm run generate`); the gateway validates them with
 * the same models and refuses a bad field with a `FlywheelError` naming it (`param`), publishing nothing.
 */
import type { FeedbackGiven, OutcomeObserved } from "./events.js";

export type * from "./events.js";

export interface ClientOptions {
  /** The gateway's base URL, as given to the OpenAI client (`http://host:port/v1`). */
  baseURL: string;
  /** The gateway API key, if the gateway has keys configured. */
  apiKey?: string;
  /** A fetch implementation (Node 20 and browsers have one). */
  fetch?: typeof fetch;
}

/** What the gateway answers once it accepted an event (it is published even while the bus is briefly down). */
export interface Accepted {
  id: string;
  type: "feedback.given" | "outcome.observed";
  interaction_id: string;
}

/** A refusal: the HTTP status, the gateway's message, and the field at fault when one is. */
export class FlywheelError extends Error {
  constructor(
    readonly status: number,
    message: string,
    readonly param: string | null,
    readonly type: string | null,
  ) {
    super(message);
    this.name = "FlywheelError";
  }
}

export class FlywheelClient {
  private readonly baseURL: string;
  private readonly apiKey?: string;
  private readonly fetchImpl: typeof fetch;

  constructor(options: ClientOptions) {
    this.baseURL = options.baseURL.replace(/\/+$/, "");
    this.apiKey = options.apiKey;
    this.fetchImpl = options.fetch ?? fetch;
  }

  /** Report what a human (or the agent for them) said or did about an answer. */
  feedback(body: FeedbackGiven): Promise<Accepted> {
    return this.post("/feedback", body);
  }

  /** Report what happened when the answer met reality: build, tests, linters, deployment. */
  outcome(body: OutcomeObserved): Promise<Accepted> {
    return this.post("/outcomes", body);
  }

  private async post(path: string, body: FeedbackGiven | OutcomeObserved): Promise<Accepted> {
    const headers: Record<string, string> = { "Content-Type": "application/json" };
    if (this.apiKey) headers.Authorization = `Bearer ${this.apiKey}`;
    const response = await this.fetchImpl(this.baseURL + path, { method: "POST", headers, body: JSON.stringify(body) });
    const answer = (await response.json().catch(() => ({}))) as Record<string, unknown>;
    if (!response.ok) {
      const error = (answer.error ?? {}) as { message?: string; param?: string; type?: string };
      throw new FlywheelError(response.status, error.message ?? `HTTP ${response.status}`, error.param ?? null,
                              error.type ?? null);
    }
    return answer as unknown as Accepted;
  }
}
