"""What the evaluator measures, and the gate that turns the figures into a verdict.

- ``generation``: greedy batch generation with the time per generated token;
- ``metrics``: answer losses per item, the held-out loss, the forgetting rate, the task pass rate
  (generated code run against the example's tests in ``plugins/sandbox.py``), the canary check;
- ``gate``: the verdict and its reasons from the candidate's and the service model's figures;
- ``data/``: general prompts with reference answers (part of the forgetting set) and canary
  prompts that invite a model to reproduce secrets or personal data.
"""
