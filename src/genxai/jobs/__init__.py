"""Jobs: what the CLI runs, as functions a script can call (``run_explain``, ``run_demo``)."""

from genxai.jobs.demo import run_demo
from genxai.jobs.explain import ExplainConfig, Explainer, explain_sections, run_explain

__all__ = ["ExplainConfig", "Explainer", "explain_sections", "run_demo", "run_explain"]
