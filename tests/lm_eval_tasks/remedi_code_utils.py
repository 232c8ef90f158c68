"""Scoring for the local code task YAMLs: the project's sandbox (remedi.tasks.code), not lm-eval's code_eval."""
from remedi.tasks import code


def process_results_humaneval(doc, results):
    """pass@1 of one greedy completion: the completion run against the problem's tests in the sandbox."""
    [score] = code.score_completions([doc], [results[0]], "humaneval")
    return {"pass@1": float(score["passed"])}
