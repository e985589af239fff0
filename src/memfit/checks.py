"""What a job asks of its model that is impossible (an error) or only unusual (a note).

:func:`check_job_for_model` runs before an estimate: it raises :class:`~memfit.errors.JobError` where no
run exists and returns the notes a user should read where the run exists but is probably not what they
meant. Torch-free; each rule names the source it follows.
"""

from __future__ import annotations

from .errors import JobError
from .job import Job
from .models.spec import ModelSpec

__all__ = ["check_job_for_model", "LEARNED_POSITIONS"]

#: Families whose position embeddings are a learned table of ``max_position_embeddings`` rows
#: (GPT-2 ``wpe``, OPT ``embed_positions``, BERT/RoBERTa/DistilBERT ``position_embeddings``): a longer
#: sequence indexes past the table and fails. Rotary families only extrapolate (quality, not memory).
LEARNED_POSITIONS = ("gpt2", "opt", "bert", "roberta", "distilbert")


def check_job_for_model(job: Job, spec: ModelSpec) -> list[str]:
    """Raise JobError for an impossible job on ``spec``; return notes for an unusual one.

    - LoRA targets that match no module of the model: nothing is trainable (PEFT raises "Target modules
      ... not found in the base model", peft/tuners/tuners_utils.py 0.21);
    - a sequence (training) or prompt + new tokens (inference) longer than ``max_position_embeddings``: a
      note; for a learned position table the note says the real run fails (an index past the table). It is
      not an error because memfit's default seq_len (2048) is longer than GPT-2's and BERT's tables, and
      ``memfit estimate gpt2`` must still answer.
    """
    from .estimator.states import lora_targets

    notes: list[str] = []
    if job.is_lora and job.lora_targets != "all-linear" and not lora_targets(spec, job):
        names = sorted({lin.name for b in spec.blocks for lin in b.linears if lin.is_module})
        raise JobError(f"lora_targets {', '.join(job.lora_targets)} match no module of {spec.name} "
                       f"(0 trainable parameters); its linears are: {', '.join(names)}")
    length = job.seq_len if job.task == "train" else job.prompt_len + job.new_tokens
    what = "seq_len" if job.task == "train" else "prompt_len + new_tokens"
    limit = spec.max_position_embeddings
    if limit and length > limit:
        if spec.model_type in LEARNED_POSITIONS:
            notes.append(f"{what} ({length}) is longer than {spec.name}'s learned position table "
                         f"(max_position_embeddings {limit}): the real run fails; set --seq-len/--prompt-len "
                         f"to at most {limit}")
        else:
            notes.append(f"{what} ({length}) is beyond {spec.name}'s max_position_embeddings ({limit}): "
                         "the memory is counted, but the model was not trained that long")
    return notes
