"""SmolLM2-135M (``models.load("smollm2-135m")``, the cpu profile's model for chapters 1-5) loaded once per test
session, on the text the chapters measure, with every claim measured once: test modules share these."""
import functools

from sinkutils import claims, data, models

#: the cpu profile's text for SmolLM2 (profiles/cpu.yml): sequences and tokens per sequence
N_TEXTS, SEQ_LEN = 16, 128


@functools.cache
def smollm2():
    """(model, tokenizer, ids) of SmolLM2-135M on the Python docs."""
    model, tokenizer = models.load("smollm2-135m")
    return model, tokenizer, data.token_batch(tokenizer, data.python_docs(), n=N_TEXTS, length=SEQ_LEN, seed=0)


@functools.cache
def smollm2_claims() -> dict[str, claims.Claim]:
    """``claims.of_model`` on ``smollm2()``, by key (the survey and the interventions run once, ``store``)."""
    model, _, ids = smollm2()
    return {c.key: c for c in claims.of_model(model, ids)}
