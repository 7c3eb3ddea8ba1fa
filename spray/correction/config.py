"""The correction's settings (``[correct]``), declared once (:mod:`spray.config`).

Torch-free, so a job spec with a ``[correct]`` section validates without loading torch; the
correction modules take their choices from here.
"""

from __future__ import annotations

from dataclasses import dataclass

from spray.config import ENTRY_POINT, Choice, ConfigError, Pattern, Range, setting, validate

METHODS: tuple[str, ...] = ("r-clarc", "p-clarc", "rr-clarc", "counterfactual")
#: Gates of R-ClArC (P-ClArC is the gate "always").
R_GATES: tuple[str, ...] = ("class", "detector", "both")
#: How a layer's activations become a CAV's features.
POOLINGS: tuple[str, ...] = ("max", "mean", "flatten")
#: CAV direction estimators: difference of means, or a linear filter.
ESTIMATORS: tuple[str, ...] = ("pattern", "svm", "logistic", "ridge")
#: The CAV's clean samples: the flag's class's other samples, or every other sample.
CLEAN_SCOPES: tuple[str, ...] = ("same_class", "all")
#: RR-ClArC: penalise the predicted logit's gradient, or all logits'.
RR_TARGETS: tuple[str, ...] = ("predicted", "all")
#: ``layer``: the model's own suggestion (the demo net's), else the last of the audit's
#: concept layers where the model can be cut (``spray.correction.user.default_layer``).
AUTO_LAYER = "auto"
LAYER_NAME = Pattern(r"\S+", "a module name from model.named_modules(), or 'auto'", optional=False)


@dataclass(frozen=True)
class CorrectionConfig:
    """Parameters of one correction (``spray correct`` and :func:`spray.correction.run.correct_model`).

    Attributes:
        method: ``"r-clarc"`` (default), ``"p-clarc"``, ``"rr-clarc"`` or ``"counterfactual"``
            (fine-tuning on the flag's evidence pasted into other classes' images under their
            true labels, :mod:`spray.correction.counterfactual`).
        flag: which flag of the audit's ``summary.json`` (0: the top one).
        reaudit: audit the corrected model again and report whether the flag is gone.
        layer: layer whose activations hold the CAV (a name from ``model.named_modules()``),
            or ``"auto"``.
        pooling: ``"flatten"`` (default: the demo's tag has a fixed position, and the whole
            activation tensor captures its signature best), ``"max"`` or ``"mean"``.
        estimator: CAV estimator of the projected/penalised direction (``"pattern"`` default).
        clean: clean samples for the CAV: ``"same_class"`` (default) or ``"all"``.
        gate: R-ClArC gate: ``"class"`` (default: the uncorrected prediction is the artifact
            class), ``"detector"`` or ``"both"``.
        detector_estimator: filter estimator of the detector gate (``"logistic"`` default).
        target_fpr: false-positive rate the detector threshold is calibrated to, on training
            samples of the other classes.
        soft_gate: scale the projection by a sigmoid of the detector score.
        temperature: soft gate temperature (detector-score units).
        rr_lambda: weight of RR-ClArC's gradient penalty.
        rr_epochs: maximum RR-ClArC fine-tuning epochs.
        rr_learning_rate: Adam learning rate of RR-ClArC.
        rr_target: explained output of the penalty: ``"predicted"`` logit or ``"all"`` logits summed.
        rr_max_samples: fine-tune RR-ClArC on a random subset of at most this many training
            samples (None: all), to bound its time on large sets.
        cf_learning_rate: counterfactual fine-tuning's Adam learning rate (the search tries
            multiples of it).
        cf_epochs: counterfactual fine-tuning's epochs.
        cf_paste_share: share of the images that get a member's evidence pasted, each epoch
            (the search tries :data:`spray.correction.counterfactual.PASTE_SHARES`).
        cf_max_samples: counterfactual fine-tuning on at most this many images per epoch.
        test_size: held-out share for the CAV's detection AUC.
        held_out: share of each class of a user job's audited samples held out (seeded, stratified)
            for the before/after evaluation; the CAV, the detector and fine-tuning see the rest
            (see :mod:`spray.correction.user`; the demo has its own test split).
        stamp: ``module:function`` or ``file.py:function`` (relative to the job file) that puts
            the artifact on images for the attacked set; empty: cut it out of the flag.
        relevance_samples: attacked images explained for the artifact-relevance share (0 skips).
        torch_export: export the corrected model as a ``torch.export`` program (``model.pt2``,
            the recommended format; any batch size).
        onnx: export it as ONNX too (``model.onnx``) when the ``onnx`` extra is installed
            (``pip install 'spray[onnx]'``); without it the export records the file as skipped.
        torchscript: also export a TorchScript file (for runtimes without ``torch.export``;
            torch 2.14 deprecates ``torch.jit``).
        search: choose the layer, the CAV estimator and RR-ClArC's strength on a validation split
            of the fitting data (:mod:`spray.correction.search`); off: take them as set.
        goal_recovered, max_clean_loss: what a correction must reach to count as fixed (with the
            re-audit no longer finding the flag; see :mod:`spray.correction.outcome`).
        min_attack_moves: the attacked set must move at least this share of the other classes'
            held-out images into the flagged class in the original model (stamped less
            unstamped), or its recovery is not checked and the verdict is at best
            "unverified": an attack that does not exercise the artifact cannot tell a fix from
            none. 0.3 is the held-out detection benchmark's bar for a model relying on its
            artifact.
        min_attack_raise: an attacked set that raises the other classes' images' mean
            probability of the flagged class by at least this much in the original model tests
            the recovery however few images it moves: the benchmark's other bar for reliance
            (0.2).
        seed: random state of every random choice (a job's ``[job] seed``).
    """

    method: str = setting("r-clarc", Choice(METHODS), doc="correction method")
    flag: int = setting(0, Range(0), doc="which flag of summary.json (0: the top one)")
    reaudit: bool = setting(True, doc="audit the corrected model again: is the flag gone?")
    layer: str = setting(AUTO_LAYER, LAYER_NAME, doc="layer whose activations hold the CAV, or 'auto'")
    pooling: str = setting("flatten", Choice(POOLINGS), doc="how activations become the CAV's features")
    estimator: str = setting("pattern", Choice(ESTIMATORS), doc="CAV direction estimator")
    clean: str = setting("same_class", Choice(CLEAN_SCOPES), doc="the CAV's clean samples")
    gate: str = setting("class", Choice(R_GATES), doc="R-ClArC: when a sample is corrected")
    detector_estimator: str = setting("logistic", Choice(ESTIMATORS), doc="estimator of the detector CAV")
    target_fpr: float = setting(0.01, Range(0.0, 1.0, high_open=True), doc="detector threshold's false-positive rate")
    soft_gate: bool = setting(False, doc="scale the projection by a sigmoid of the detector score")
    temperature: float = setting(1.0, Range(0.0, low_open=True), doc="soft gate temperature")
    rr_lambda: float = setting(100.0, Range(0.0), doc="RR-ClArC: weight of the gradient penalty")
    rr_epochs: int = setting(3, Range(1), doc="RR-ClArC: most fine-tuning epochs")
    rr_learning_rate: float = setting(1e-3, Range(0.0, low_open=True), doc="RR-ClArC: Adam's learning rate")
    rr_target: str = setting("predicted", Choice(RR_TARGETS), doc="RR-ClArC: penalised logit(s)")
    rr_max_samples: int | None = setting(None, Range(1), doc="RR-ClArC: fine-tune on at most this many samples")
    cf_learning_rate: float = setting(3e-4, Range(0.0, low_open=True), doc="counterfactual fine-tuning: Adam's learning rate")
    cf_epochs: int = setting(2, Range(1), doc="counterfactual fine-tuning: epochs")
    cf_paste_share: float = setting(0.5, Range(0.0, 1.0, low_open=True), doc="counterfactual fine-tuning: share of images pasted")
    cf_max_samples: int | None = setting(4000, Range(1), doc="counterfactual fine-tuning: images per epoch, at most")
    test_size: float = setting(0.25, Range(0.0, 1.0, low_open=True, high_open=True), doc="share held out for the CAV's AUC")
    held_out: float = setting(0.25, Range(0.0, 1.0, low_open=True, high_open=True), doc="share of each class held out for evaluation")
    stamp: str = setting("", ENTRY_POINT, doc="function that stamps the artifact (empty: cut it out of the flag)")
    relevance_samples: int = setting(64, Range(0), doc="attacked images explained for the artifact's relevance share")
    goal_recovered: float = setting(0.8, Range(0.0, 1.0), doc="share of the attacked-accuracy loss a fix must recover")
    max_clean_loss: float = setting(0.005, Range(0.0, 1.0), doc="clean accuracy a fix may cost (0.005: half a point)")
    min_attack_moves: float = setting(
        0.3, Range(0.0, 1.0),
        doc="share of the other classes' images the attacked set must move into the class before the correction for its "
            "recovery to judge the fix (else: not checked, unverified)",
    )
    min_attack_raise: float = setting(
        0.2, Range(0.0, 1.0),
        doc="or the rise of the other classes' images' mean probability of the class that lets its recovery judge the fix",
    )
    search: bool = setting(True, doc="choose layer, CAV estimator and RR-ClArC strength on a validation split")
    torch_export: bool = setting(True, doc="export the corrected model as a torch.export program (model.pt2)")
    onnx: bool = setting(True, doc="also export it as ONNX when the onnx extra is installed")
    torchscript: bool = setting(True, doc="also export the corrected model as TorchScript")
    seed: int = setting(0, Range(0, 2**32 - 1), doc="random state (the job's seed)", job_key=False)

    def __post_init__(self) -> None:
        if self.gate == "always":
            raise ConfigError("gate", "'always' is P-ClArC: set method = 'p-clarc' (R-ClArC gates: class, detector, both)")
        validate(self)
