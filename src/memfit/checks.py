"""What a job asks of its model that is impossible (an error) or only unusual (a note).

:func:`check_job_for_model` runs before an estimate: it raises :class:`~memfit.errors.JobError` where no
run exists and returns the notes a user should read where the run exists but is probably not what they
meant. Torch-free; each rule names the source it follows.
"""

from __future__ import annotations

from .errors import JobError
from .job import Job
from .models.spec import ModelSpec

__all__ = ["check_job_for_model", "refuse_past_position_table", "LEARNED_POSITIONS"]

from .models import LEARNED_POSITIONS, spec_position_limit  # noqa: E402 - re-exported


def check_job_for_model(job: Job, spec: ModelSpec) -> list[str]:
    """Raise JobError for an impossible job on ``spec``; return notes for an unusual one.

    - LoRA targets that match no module of the model: nothing is trainable (PEFT raises "Target modules
      ... not found in the base model", peft/tuners/tuners_utils.py 0.21);
    - a sequence (training) or prompt + new tokens (inference) longer than a learned position table (GPT-2,
      OPT, BERT, RoBERTa, DistilBERT: :func:`memfit.models.spec_position_limit`): an error, the real run indexes
      past the table (``IndexError: index out of range in self`` on the CPU, a device-side assert on CUDA).
      A job that names no length gets one the model takes (:data:`memfit.job.DEFAULT_SEQ_LEN`), so
      ``memfit estimate gpt2`` still answers. Longer than a rotary model's ``max_position_embeddings``: a
      note (the model extrapolates; the memory is counted).
    """
    from .estimator.states import lora_targets

    notes: list[str] = []
    if job.is_lora and job.lora_targets != "all-linear" and not lora_targets(spec, job):
        names = sorted({lin.name for b in spec.blocks for lin in b.linears if lin.is_module})
        raise JobError(f"lora_targets {', '.join(job.lora_targets)} match no module of {spec.name} "
                       f"(0 trainable parameters); its linears are: {', '.join(names)}")
    length = job.seq_len if job.task == "train" else job.prompt_len + job.new_tokens
    what = "seq_len" if job.task == "train" else "prompt_len + new_tokens"
    found = spec_position_limit(spec)
    if found and length > found[0]:
        limit, learned = found
        if learned:
            key = "n_positions" if spec.model_type == "gpt2" else "max_position_embeddings"
            fix = (f"--seq-len {limit} or less (seq_len in a job file)" if job.task == "train" else
                   f"prompt_len + new_tokens of {limit} or less (--prompt-len, --new-tokens)")
            raise JobError(f"{what} {length} is longer than {spec.name}'s learned position table ({limit} "
                           f"positions, {key} {spec.max_position_embeddings}): the real run fails indexing past "
                           f"it; use {fix}")
        notes.append(f"{what} ({length}) is beyond {spec.name}'s max_position_embeddings ({limit}): "
                     "the memory is counted, but the model was not trained that long")
    return notes


def refuse_past_position_table(job: Job, spec) -> None:
    """For the engines that run the model (trace, measure), before they build anything: a sequence longer than
    a learned position table has no run (the fake run's IndexError, a device-side assert on CUDA), so it gets
    :func:`check_job_for_model`'s one-line error instead. Models without such a table are left to the run."""
    if isinstance(spec, ModelSpec):
        found = spec_position_limit(spec)
        if found and found[1]:
            check_job_for_model(job, spec)
