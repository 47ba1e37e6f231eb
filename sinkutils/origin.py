"""Identity sink or structural sink? (chapter 3, "Whose sink is it?").

A model can sink on token 0 for two different reasons. In an *identity* sink the BOS token's embedding is
recognised (every training row started with it): the sink follows BOS wherever it stands and vanishes when
position 0 holds an ordinary token. In a *structural* sink, the paper's mechanism, position 0 is singled out by
the causal mask alone (its attention output is one value vector, never an average): the sink stays on token 0
whatever token it is, and blocking aggregation at another position k makes k a sink too. Four probes tell them
apart on any model ``trace`` can instrument (the embedded models, Llama-2/3 and the other hub models alike):

1. an ordinary first token: the same text without BOS;
2. BOS moved to position k, an ordinary token at 0;
3. token 0's attention output zeroed in layer 0 (the start of the paper's chain), BOS kept;
4. the mask intervention at k (chapter 3's first section), BOS kept.

Each reads the mean attention that the queries after a key give it, averaged over heads and over the *sink
layers* (those at least half as sunk as the strongest, measured on the usual input).
"""
from __future__ import annotations

import dataclasses

import torch

from sinkutils import interventions, measure, store

#: The share of the usual sink that must survive an ordinary first token for a sink to count as structural,
#: and the share BOS must carry to another position to count as an identity sink.
STRUCTURAL_SHARE = 0.5
IDENTITY_SHARE = 0.25
#: Below this mean attention to token 0 in its strongest layer there is no sink to diagnose.
MIN_SINK = 0.1


@dataclasses.dataclass
class SinkOrigin:
    """The four probes of one model, per layer (``per_layer``) and averaged over ``sink_layers``."""

    k: int
    sink_layers: list[int]
    per_layer: dict[str, torch.Tensor]  # probe name -> (layers,) mean attention to the probed key

    def mean(self, probe: str) -> float:
        """``probe`` averaged over the sink layers."""
        return float(self.per_layer[probe][self.sink_layers].mean())

    @property
    def structural_share(self) -> float:
        """Attention to an ordinary token 0 over attention to BOS at 0: how much of the sink is positional."""
        return self.mean("ordinary token at 0") / self.mean("BOS at 0 (usual input)")

    @property
    def identity_share(self) -> float:
        """Attention to BOS moved to k over attention to BOS at 0: how much of the sink travels with BOS."""
        return self.mean("BOS moved to k") / self.mean("BOS at 0 (usual input)")

    @property
    def verdict(self) -> str:
        """"none", "structural", "identity" or "mixed" (neither share is decisive), by the thresholds above."""
        if self.mean("BOS at 0 (usual input)") < MIN_SINK:
            return "none"
        if self.structural_share >= STRUCTURAL_SHARE:
            return "structural"
        if self.identity_share >= IDENTITY_SHARE:
            return "identity"
        return "mixed"

    def table(self) -> str:
        """A markdown table of the probes over the sink layers, for the chapter."""
        rows = [f"| {name} | {self.mean(name):.3f} |" for name in self.per_layer]
        return "\n".join(["| probe (sink layers " + ", ".join(map(str, self.sink_layers)) + ") | attention |",
                          "|---|---|", *rows])


def bos_moved(ids: torch.Tensor, k: int) -> torch.Tensor:
    """``ids`` (BOS + text) with BOS taken from position 0 and put at position ``k``: the text that followed
    BOS now starts the row, so token 0 is an ordinary token and the length is unchanged."""
    return torch.cat([ids[:, 1:k + 1], ids[:, :1], ids[:, k + 1:]], dim=1)


@torch.no_grad()
def sink_origin(model, ids: torch.Tensor, k: int = 10, batch_size: int = 8, progress: bool = True) -> SinkOrigin:
    """Run the four probes on ``ids``, rows of BOS + text (``data.token_batch``); ``k`` as in the mask
    intervention (1..T-2). Attention to a key is ``measure.attention_to``'s: queries after it, mean over heads. The
    usual input and the ordinary first token are ``measure.survey``s (the latter shared with chapter 5's direction
    lock), BOS moved is one pass for its two keys, the mask probe is ``measure.mask_effect``'s; the whole is kept by
    ``store``."""
    bos = ids[:, 0]
    if ids.shape[0] == 0 or not bool((bos == bos[0]).all()) or bool((ids[:, 1:] == bos[0]).any()):
        raise ValueError("sink_origin needs rows that start with the BOS token and hold it nowhere else "
                         "(data.token_batch makes them)")
    k = interventions.check_position(k, ids.shape[1], attended=True)

    def measured() -> SinkOrigin:
        usual = measure.survey(model, ids, k=k, batch_size=batch_size, progress=progress)
        moved = measure.attention_to(model, bos_moved(ids, k), (k, 0), batch_size, progress).mean(-1)
        to_first = usual.attention_to(0).mean(-1).float()
        per_layer = {"BOS at 0 (usual input)": to_first,
                     "ordinary token at 0": measure.survey(model, ids[:, 1:], batch_size=batch_size,
                                                           progress=progress).attention_to(0).mean(-1).float(),
                     "BOS moved to k": moved[0], "token 0 when BOS is at k": moved[1]}
        with interventions.edit_head_output(model, 0, 0, torch.zeros_like):
            per_layer["token 0, its layer-0 attention output zeroed"] = measure.attention_to(
                model, ids, 0, batch_size, progress).mean(-1)
        effect = measure.mask_effect(model, ids, k, batch_size=batch_size, progress=progress)
        per_layer["k, no intervention"] = effect.before
        per_layer["k, aggregation blocked at k"] = effect.after
        return SinkOrigin(k=k, sink_layers=measure.sink_layers(to_first), per_layer=per_layer)

    return store.cached("sink_origin", model, ids, dict(k=k, batch_size=batch_size), measured)
