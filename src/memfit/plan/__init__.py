"""``memfit plan``: what would make a job fit a card, ranked by estimated speed; the step-time model."""

from .search import Candidate, PlanResult, fits, max_seq_len, plan
from .steptime import StepTime, step_time

__all__ = ["plan", "fits", "max_seq_len", "Candidate", "PlanResult", "StepTime", "step_time"]
