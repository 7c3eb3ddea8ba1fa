"""Class Artifact Compensation (ClArC): remove an artifact's CAV direction from a model's activations.

**P-ClArC** (projective) inserts, after a layer, the projection

    a' = a - (v · a - v · mean_clean) v

which sets the activation's component along the unit CAV ``v`` to the value the clean
samples have on average, and leaves every orthogonal component unchanged. The network
above the layer then sees the artifact as absent.

**R-ClArC** (reactive) applies the same projection only where a *gate* fires, so samples
the artifact cannot concern keep their exact original outputs. The gate is computed in the
same forward pass:

1. run the model up to the layer once (``prefix``);
2. run the rest once (``head``) to get the uncorrected logits and predictions;
3. evaluate the gate (predicted class among ``target_classes``, a detector CAV score over a
   calibrated threshold, or both);
4. re-run only ``head``, only on the gated samples, with the projected activation, and
   write those logits into a copy of the uncorrected ones.

Outputs for samples whose gate does not fire are the very tensors of step 2, bit for bit.
A soft gate (``sigmoid((score - threshold) / temperature)``) scales the projection instead
of switching it; weights below ``min_weight`` count as not firing.

**RR-ClArC** (right reason) fine-tunes a copy of the model so that it becomes insensitive
along the CAV: the loss is cross-entropy plus ``lambda`` times the mean squared directional
derivative of the explained logit along ``v`` at the layer (see :func:`rr_clarc`).

*Pooled CAVs on convolutional layers.* A CAV estimated from max- or mean-pooled activations
has one entry per channel. It is applied on the channel axis at every spatial position, and
each position's component is moved to the clean samples' mean component *at that position*
(``CAV.reference`` holds one value per position). A single pooled reference value for every
position would shift positions the artifact never touches (the max-pooled value is far
above a typical position's value); the per-position reference keeps clean inputs, on
average, where they were.

*Splitting the model.* ``prefix`` and ``head`` come from a torch.fx trace cut at the layer.
This needs the layer's output to be the only value that crosses the cut: true for
feed-forward stacks (the demo net, VGG-like nets, a layer at the end of a residual stage),
not inside a residual block, where a clear error names the problem.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Tuple

import numpy as np
import torch
from torch import fx, nn

from spray.correction.cav import CAV, layer_module
from spray.correction.config import RR_TARGETS
from spray.correction.errors import CorrectionError

log = logging.getLogger(__name__)

GATE_KINDS: tuple[str, ...] = ("always", "class", "detector", "both")
RR_PENALTY_POINTS: tuple[str, ...] = ("path", "data")


@dataclass(frozen=True)
class Gate:
    """When R-ClArC projects a sample.

    Attributes:
        kind: ``"class"`` (the uncorrected prediction is one of ``target_classes``),
            ``"detector"`` (the detector CAV's score reaches ``threshold``), ``"both"``
            (class and detector) or ``"always"`` (every sample: P-ClArC).
        target_classes: classes the artifact pushes towards (for ``"class"`` and ``"both"``).
        threshold: detector score threshold (for ``"detector"`` and ``"both"``), e.g. from
            :func:`calibrate_threshold`.
        soft: scale the projection by ``sigmoid((score - threshold) / temperature)``
            instead of switching it on at the threshold.
        temperature: softness of the soft gate, in detector-score units.
        min_weight: soft weights below this count as "does not fire" (outputs untouched).
    """

    kind: str = "class"
    target_classes: tuple[int, ...] = ()
    threshold: float = 0.0
    soft: bool = False
    temperature: float = 1.0
    min_weight: float = 0.01

    def __post_init__(self) -> None:
        if self.kind not in GATE_KINDS:
            raise CorrectionError(f"unknown gate kind {self.kind!r}; choose one of {list(GATE_KINDS)}.")
        if self.kind in ("class", "both") and not self.target_classes:
            raise CorrectionError(f"gate {self.kind!r} needs target_classes (the classes the artifact pushes towards).")
        if self.temperature <= 0 or not math.isfinite(self.temperature):
            raise CorrectionError(f"gate temperature must be a positive number, got {self.temperature}.")
        if not 0.0 <= self.min_weight < 1.0:
            raise CorrectionError(f"gate min_weight must be in [0, 1), got {self.min_weight}.")

    @property
    def uses_detector(self) -> bool:
        return self.kind in ("detector", "both")


def calibrate_threshold(clean_scores: np.ndarray, target_fpr: float = 0.01) -> float:
    """Detector threshold at which at most ``target_fpr`` of the clean scores reach it.

    Uses the ``1 - target_fpr`` quantile of the clean samples' scores (``"higher"``
    interpolation, so the realised false-positive rate on these samples is at most the target).
    """
    scores = np.asarray(clean_scores, dtype=np.float64).ravel()
    if scores.size == 0:
        raise CorrectionError("threshold calibration needs at least one clean score.")
    if not 0.0 <= target_fpr < 1.0:
        raise CorrectionError(f"target_fpr must be in [0, 1), got {target_fpr}.")
    threshold = float(np.quantile(scores, 1.0 - target_fpr, method="higher"))
    # Scores equal to the threshold fire; move just above ties so they stay below the target.
    return float(np.nextafter(threshold, np.inf))


def project_activation(
    activation: torch.Tensor, direction: torch.Tensor, reference: torch.Tensor, weight: torch.Tensor, per_position: bool
) -> torch.Tensor:
    """``a - weight * (v · a - reference) v`` for a batch of activations.

    ``per_position``: ``direction`` (C,) acts on the channel axis at every spatial position
    and ``reference`` has the spatial shape; otherwise ``direction`` acts on the flattened
    activation and ``reference`` is a scalar. ``weight`` (B,) scales the step per sample
    (1 is the full projection, 0 leaves a sample unchanged).
    """
    batch = activation.shape[0]
    v = direction.to(activation.dtype)
    if per_position and activation.dim() > 2:
        flat = activation.flatten(2)  # (B, C, L)
        component = torch.einsum("bcl,c->bl", flat, v)
        shift = (component - reference.to(activation.dtype).flatten()[None, :]) * weight.to(activation.dtype)[:, None]
        corrected = flat - shift[:, None, :] * v[None, :, None]
        return corrected.reshape(activation.shape)
    flat = activation.reshape(batch, -1)
    component = flat @ v
    shift = (component - reference.to(activation.dtype).reshape(())) * weight.to(activation.dtype)
    return (flat - shift[:, None] * v[None, :]).reshape(activation.shape)


def split_model(model: nn.Module, layer: str) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Cut ``model`` after ``layer`` into ``prefix`` (input -> layer output) and ``head`` (layer output -> logits).

    Both halves share the model's modules and parameters (no copy). Raises
    :class:`CorrectionError` when the model cannot be traced with torch.fx, when the layer
    is called more than once, or when values other than the layer's output cross the cut.
    """
    target = layer_module(model, layer)

    class _LeafAtLayer(fx.Tracer):
        def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
            return module is target or super().is_leaf_module(module, qualified_name)

    try:
        graph = _LeafAtLayer().trace(model)
    except Exception as error:  # fx raises many kinds of errors on untraceable code
        raise CorrectionError(
            f"the model cannot be traced with torch.fx ({type(error).__name__}: {error}); "
            "ClArC needs a traceable forward to cut it at the layer."
        ) from error
    nodes = list(graph.nodes)
    cuts = [i for i, node in enumerate(nodes) if node.op == "call_module" and node.target == layer]
    if len(cuts) != 1:
        raise CorrectionError(f"layer {layer!r} is called {len(cuts)} times in the forward pass; ClArC needs a layer called exactly once.")
    index = cuts[0]
    cut = nodes[index]
    before = set(nodes[:index])
    for node in nodes[index + 1 :]:
        crossing = [arg for arg in node.all_input_nodes if arg in before]
        if crossing:
            raise CorrectionError(
                f"layer {layer!r} is not a cut point of the model: {[n.name for n in crossing]} computed before it "
                f"are used after it (e.g. a skip connection). Choose a layer whose output is all the rest of the network sees "
                "(e.g. the end of a residual stage)."
            )

    prefix_graph = fx.Graph()
    prefix_env: dict[fx.Node, fx.Node] = {}
    for node in nodes[: index + 1]:
        prefix_env[node] = prefix_graph.node_copy(node, lambda n: prefix_env[n])
        prefix_env[node].type = None  # TorchScript cannot read fx's type annotations
    prefix_graph.output(prefix_env[cut])

    head_graph = fx.Graph()
    head_env: dict[fx.Node, fx.Node] = {cut: head_graph.placeholder("activation")}
    for node in nodes[index + 1 :]:
        head_env[node] = head_graph.node_copy(node, lambda n: head_env[n])
        head_env[node].type = None
    return fx.GraphModule(model, prefix_graph), fx.GraphModule(model, head_graph)


class ClarcModel(nn.Module):
    """A classifier corrected with P-ClArC (gate ``"always"``) or R-ClArC (any other gate).

    ``forward(x)`` returns the corrected logits; ``forward_gated(x)`` also returns the gate
    weight per sample (0 where the sample was left untouched). The wrapper shares the
    model's parameters: it changes no weight. It can be compiled with ``torch.jit.script``
    (see :mod:`spray.correction.export`); the gate is part of the compiled forward.

    Args:
        model: the classifier to correct.
        cav: the CAV whose direction is projected out (usually a pattern CAV).
        gate: when to project (:class:`Gate`).
        detector: the CAV whose score the detector gate thresholds (usually a filter CAV,
            same layer); defaults to ``cav``.
    """

    __jit_ignored_attributes__ = ["model", "gate", "cav", "detector_cav"]

    def __init__(self, model: nn.Module, cav: CAV, gate: Gate, detector: CAV | None = None) -> None:
        super().__init__()
        detector = cav if detector is None else detector
        if detector.layer != cav.layer:
            raise CorrectionError(f"the detector CAV is at layer {detector.layer!r} but the projected CAV at {cav.layer!r}; use one layer.")
        n_out = _output_width(model)
        bad = [c for c in gate.target_classes if not 0 <= c < n_out] if n_out else []
        if bad:
            raise CorrectionError(
                f"gate target class(es) {bad} out of range: the model has {n_out} outputs (ids 0..{n_out - 1}). "
                "Pass the id of the class the artifact pushes towards (the flagged cluster's class)."
            )
        # Registered first so that module walks (e.g. zennit's BatchNorm-merging canonizer) see
        # the original containers; the compiled forward never touches it.
        self.model = model
        self.prefix, self.head = split_model(model, cav.layer)
        self.layer = cav.layer
        self.gate_kind = gate.kind
        self.soft = bool(gate.soft)
        self.per_position = bool(cav.per_position)
        self.detector_pooling = detector.pooling
        self.register_buffer("direction", cav.direction.detach().clone().float())
        self.register_buffer("reference", cav.reference.detach().clone().float())
        self.register_buffer("detector_direction", detector.direction.detach().clone().float())
        self.register_buffer("detector_intercept", torch.tensor(float(detector.intercept)))
        self.register_buffer("threshold", torch.tensor(float(gate.threshold)))
        self.register_buffer("temperature", torch.tensor(float(gate.temperature)))
        self.register_buffer("min_weight", torch.tensor(float(gate.min_weight)))
        self.register_buffer("target_classes", torch.tensor(list(gate.target_classes), dtype=torch.long))
        self.gate = gate
        self.cav = cav
        self.detector_cav = detector

    def gate_weights(self, activation: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Per-sample projection weight in [0, 1] (0: leave the sample exactly as it is)."""
        weight = torch.ones(activation.shape[0], dtype=activation.dtype, device=activation.device)
        if self.gate_kind == "class" or self.gate_kind == "both":
            predicted = logits.argmax(dim=1)
            hit = (predicted[:, None] == self.target_classes[None, :]).any(dim=1)
            weight = weight * hit.to(weight.dtype)
        if self.gate_kind == "detector" or self.gate_kind == "both":
            score = self.detector_score(activation)
            if self.soft:
                soft = torch.sigmoid((score - self.threshold) / self.temperature)
                fired = torch.where(soft >= self.min_weight, soft, torch.zeros_like(soft))
            else:
                fired = (score >= self.threshold).to(weight.dtype)
            weight = weight * fired.to(weight.dtype)
        return weight

    def detector_score(self, activation: torch.Tensor) -> torch.Tensor:
        """Detector CAV score (B,) of layer activations."""
        if activation.dim() <= 2:
            features = activation
        elif self.detector_pooling == "max":
            features = activation.flatten(2).amax(dim=2)
        elif self.detector_pooling == "mean":
            features = activation.flatten(2).mean(dim=2)
        else:
            features = activation.flatten(1)
        return features @ self.detector_direction.to(features.dtype) + self.detector_intercept.to(features.dtype)

    @torch.jit.export
    def forward_gated(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Corrected logits and the per-sample gate weight."""
        activation = self.prefix(x)
        if self.gate_kind == "always":
            weight = torch.ones(activation.shape[0], dtype=activation.dtype, device=activation.device)
            projected = project_activation(activation, self.direction, self.reference, weight, self.per_position)
            return self.head(projected), weight
        logits = self.head(activation)
        weight = self.gate_weights(activation, logits)
        rows = torch.nonzero(weight > 0).flatten()
        if rows.numel() == 0:
            return logits, weight
        projected = project_activation(
            activation.index_select(0, rows), self.direction, self.reference, weight.index_select(0, rows), self.per_position
        )
        corrected = self.head(projected)
        return logits.index_copy(0, rows, corrected.to(logits.dtype)), weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_gated(x)[0]

    @torch.jit.unused
    def explainable(self) -> ExplainableClarc:
        """A view with the same logits and a single head pass, for LRP (see :class:`ExplainableClarc`)."""
        return ExplainableClarc(self)


class ExplainableClarc(nn.Module):
    """The same corrected logits as a :class:`ClarcModel`, with one pass through the head.

    LRP libraries such as zennit keep one set of stored tensors per module, so a forward
    that runs the head twice (as R-ClArC's does) cannot be explained. This view computes
    the gate weights without gradients first, then projects every sample with its weight
    (weight 0 is the identity, bit for bit) and runs the head once, so attribution methods
    see a plain feed-forward model. Use it for heatmaps and audits of a corrected model.

    The model's children are registered first and under their own names, so canonizers see
    the original containers and every layer keeps its name from the original model (an
    audit's concept layers and analysis spaces apply to the view unchanged). The fast LRP
    engine cannot trace the gate; ``make_explainer`` falls back to zennit's hooks.
    """

    def __init__(self, clarc: ClarcModel) -> None:
        super().__init__()
        children = dict(clarc.model.named_children())
        if "clarc" in children:
            raise CorrectionError("the model has a child module called 'clarc', which the explainable view needs for itself; rename it.")
        for name, child in children.items():
            self.add_module(name, child)
        self.clarc = clarc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # detached: attribution hooks on the modules skip tensors without gradient
            weight = self.clarc.forward_gated(x.detach())[1]
        activation = self.clarc.prefix(x)
        projected = project_activation(activation, self.clarc.direction, self.clarc.reference, weight, self.clarc.per_position)
        return self.clarc.head(projected)


def _output_width(model: nn.Module) -> int:
    """Number of outputs of the model's last Linear layer (0 when there is none)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return int(linears[-1].out_features) if linears else 0


def p_clarc(model: nn.Module, cav: CAV) -> ClarcModel:
    """P-ClArC: project every sample's activation (gate ``"always"``)."""
    return ClarcModel(model, cav, Gate(kind="always"))


def r_clarc(model: nn.Module, cav: CAV, gate: Gate, detector: CAV | None = None) -> ClarcModel:
    """R-ClArC: project only where ``gate`` fires (see :class:`Gate`)."""
    if gate.kind == "always":
        raise CorrectionError("gate 'always' is P-ClArC; use p_clarc() or a gate of kind 'class', 'detector' or 'both'.")
    return ClarcModel(model, cav, gate, detector)


@dataclass
class RRHistory:
    """What RR-ClArC fine-tuning did: objective per epoch on the validation split, chosen epoch, time.

    ``initial_*`` are the validation values of the model before fine-tuning; ``best_epoch``
    is -1 when no epoch improved on them (the returned model is then the original's copy).
    """

    initial_val_loss: float = float("nan")
    initial_val_penalty: float = float("nan")
    initial_val_accuracy: float = float("nan")
    val_loss: list[float] = field(default_factory=list)
    val_penalty: list[float] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)
    best_epoch: int = -1
    seconds: float = 0.0


def _directional_penalty(grad: torch.Tensor, direction: torch.Tensor, per_position: bool) -> torch.Tensor:
    """Mean over the batch of the squared derivative along the CAV (summed over positions when per position)."""
    v = direction.to(grad.dtype)
    if per_position and grad.dim() > 2:
        along = torch.einsum("bcl,c->bl", grad.flatten(2), v)
        return along.pow(2).sum(dim=1).mean()
    return (grad.reshape(grad.shape[0], -1) @ v).pow(2).mean()


def rr_clarc(
    model: nn.Module,
    cav: CAV,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    lam: float = 100.0,
    epochs: int = 3,
    learning_rate: float = 1e-3,
    batch_size: int = 64,
    val_fraction: float = 0.15,
    patience: int = 2,
    target: str = "predicted",
    penalty_at: str = "path",
    random_state: int = 0,
) -> tuple[nn.Module, RRHistory]:
    """RR-ClArC: fine-tune a copy of ``model`` to be insensitive along the CAV.

    The loss per batch is ``CE + lam * mean((grad_a f · v)^2)``, where ``a`` is the output of
    ``cav.layer``, ``f`` the predicted logit (``target="predicted"``) or the sum of all
    logits (``"all"``), and ``v`` the CAV direction. For a pooled CAV on a convolutional
    layer, the derivative is taken along ``v`` at each position and the squares are summed
    over positions, so a sensitivity at one position cannot hide behind an opposite one
    elsewhere.

    ``penalty_at`` says where the gradient is taken:

    * ``"data"``: at the samples' own activations (the penalty as usually stated);
    * ``"path"`` (default): at a point drawn uniformly on the segment from each sample's
      activation to the same activation with its CAV component moved to the artifact
      samples' mean (``CAV.artifact_reference``). The artifact shifts activations far along
      ``v`` (tens of units on the demo), and a ReLU network flat *at* the clean points can
      still respond to such a shift; flattening the whole segment bounds the logit change
      the shift causes (its integral of the derivative). It costs a second pass through
      the layers above ``cav.layer``.

    Adam runs for at most ``epochs`` epochs; after each, the objective is measured on a
    stratified validation split (``val_fraction`` of ``images``, fixed path points) and the
    best weights are kept; training stops after ``patience`` epochs without improvement.
    The model stays in eval mode (BatchNorm statistics frozen): the correction should change
    what the model attends to, not its normalisation. Note that Adam is invariant to the
    scale of the loss: once the penalty dominates, a larger ``lam`` changes little.
    Returns the fine-tuned copy and its history.
    """
    from sklearn.model_selection import train_test_split

    if target not in RR_TARGETS:
        raise CorrectionError(f"unknown RR-ClArC target {target!r}; choose one of {list(RR_TARGETS)}.")
    if penalty_at not in RR_PENALTY_POINTS:
        raise CorrectionError(f"unknown RR-ClArC penalty_at {penalty_at!r}; choose one of {list(RR_PENALTY_POINTS)}.")
    if epochs < 1:
        raise CorrectionError(f"RR-ClArC needs at least one epoch, got {epochs}.")
    start = time.perf_counter()
    torch.manual_seed(random_state)
    tuned = copy.deepcopy(model).eval()
    prefix, head = split_model(tuned, cav.layer)
    labels = np.asarray(labels, dtype=np.int64)
    fit_rows, val_rows = train_test_split(
        np.arange(len(images)), test_size=val_fraction, stratify=labels, random_state=random_state
    )
    x_all, y_all = torch.as_tensor(images), torch.as_tensor(labels)
    direction = cav.direction.detach().float()
    artifact_level = cav.artifact_reference.detach().float()

    def objective(
        x: torch.Tensor, y: torch.Tensor, create_graph: bool, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        activation = prefix(x)
        logits = head(activation)
        predicted = logits.argmax(1, keepdim=True).detach()
        if penalty_at == "data":
            point, point_logits = activation, logits
        else:
            step = torch.rand(x.shape[0], generator=generator)
            point = project_activation(activation, direction, artifact_level, step, cav.per_position)
            point_logits = head(point)
        explained = point_logits.gather(1, predicted).sum() if target == "predicted" else point_logits.sum()
        (grad,) = torch.autograd.grad(explained, point, create_graph=create_graph)
        penalty = _directional_penalty(grad, direction, cav.per_position)
        ce = nn.functional.cross_entropy(logits, y)
        return ce + lam * penalty, penalty, logits

    def validate() -> tuple[float, float, float]:
        generator = torch.Generator().manual_seed(random_state + 1)
        total = penalty_total = correct = 0.0
        for s in range(0, len(val_rows), 256):
            index = torch.as_tensor(val_rows[s : s + 256])
            loss, penalty, logits = objective(x_all[index], y_all[index], False, generator)
            total += float(loss.detach()) * len(index)
            penalty_total += float(penalty.detach()) * len(index)
            correct += float((logits.argmax(1) == y_all[index]).sum())
        n = len(val_rows)
        return total / n, penalty_total / n, correct / n

    parameters = [p for p in tuned.parameters() if p.requires_grad]
    optimiser = torch.optim.Adam(parameters, lr=learning_rate)
    generator = torch.Generator().manual_seed(random_state)
    history = RRHistory()
    best_state = copy.deepcopy(tuned.state_dict())
    loss0, penalty0, accuracy0 = validate()
    history.initial_val_loss, history.initial_val_penalty, history.initial_val_accuracy = loss0, penalty0, accuracy0
    best_loss, stale = loss0, 0
    log.info("RR-ClArC start: val loss %.4f (penalty %.4g, accuracy %.3f)", loss0, penalty0, accuracy0)
    for epoch in range(epochs):
        order = torch.as_tensor(fit_rows)[torch.randperm(len(fit_rows), generator=generator)]
        for s in range(0, len(order), batch_size):
            index = order[s : s + batch_size]
            optimiser.zero_grad()
            loss, _, _ = objective(x_all[index], y_all[index], True, generator)
            loss.backward()
            optimiser.step()
        val_loss, val_penalty, val_accuracy = validate()
        history.val_loss.append(val_loss)
        history.val_penalty.append(val_penalty)
        history.val_accuracy.append(val_accuracy)
        log.info("RR-ClArC epoch %d/%d: val loss %.4f (penalty %.4g, accuracy %.3f)", epoch + 1, epochs, val_loss, val_penalty, val_accuracy)
        if val_loss < best_loss:
            best_loss, stale, history.best_epoch = val_loss, 0, epoch
            best_state = copy.deepcopy(tuned.state_dict())
        else:
            stale += 1
            if stale >= patience:
                break
    tuned.load_state_dict(best_state)
    tuned.eval()
    for parameter in tuned.parameters():
        parameter.grad = None
    history.seconds = time.perf_counter() - start
    return tuned, history
