"""The fast LRP engine: a model compiled into a list of steps with explicit relevance rules.

``FastExplainer`` gives the heatmaps of zennit's composites (rules in
``spray.attribution.fast_rules``) without
autograd hooks. At construction the model is canonized with zennit's own canonizers
(BatchNorm merging, the ResNet and VGG canonizers), traced with ``torch.fx``, and turned into
steps whose parameters are snapshots of the canonized weights; then the canonizers are
reverted, so the model is left as it was. Each batch then costs

- one forward pass without autograd, by default with zennit's arithmetic (the model's own
  NCHW convolutions, each BatchNorm applied after its layer), so the forward values are
  zennit's bit for bit; ``forward="fast"`` instead folds merged BatchNorms into the
  convolution before them and runs channels-last convolutions;
- one backward sweep in which every layer applies its rule as a modified linear map and its
  adjoint (channels-last convolutions for float32 and lower precision); the relevance at each
  named layer is summed over space on the way (the concept relevance vector).

Why the forward follows zennit: the epsilon and norm rules divide by a layer's output plus a
small stabiliser, R / (z + ε·sign z), and R is itself proportional to z; where z is a sum of
large terms that nearly cancels, so that it is as small as its own rounding error and as ε,
the quotient z / (z + ε) depends on z's last bits. A forward pass that rounds differently
from zennit's (folded weights, another convolution algorithm) therefore moves 224-pixel
float32 heatmaps by up to a few 1e-3 relative, while rounding in the backward sweep is not
amplified that way: with zennit's forward, float32 heatmaps equal zennit's to about 1e-6.

Models the engine cannot compile raise ``UnsupportedModel`` with the reason;
``spray.attribution.select.make_explainer`` then falls back to zennit's engine
(``spray.attribution.lrp.Explainer``).

Supported: ``nn.Conv1d/2d/3d`` (zero padding) and ``nn.Linear`` with the rules of
``fast_rules``; BatchNorm (eval); zennit's activations (Pass rule); max, average and adaptive
pooling modules; ``nn.Flatten``, dropout, ``nn.Identity``; ``torch.flatten``, ``view``,
``reshape``, ``size``, ``torch.cat``, tensor additions, functional ``relu``, pooling, dropout
and ``mean`` (the plain gradient, as zennit hooks only modules); zennit's ``Sum`` after
``torch.stack`` (the residual additions made explicit by the ResNet canonizer). Not supported
(the fallback takes over): other modules and functions (e.g. ``nn.Mish``, products of tensors,
slicing), parameters used outside their modules, models that fail to trace, several inputs or
outputs, and a module with a rule that is called more than once.

The package follows those parts: ``steps`` (one step per traced node: its forward value and
its relevance rule), ``compiler`` (tracing, canonizing and planning memory:
``compile_model``) and ``explainer`` (``FastExplainer``: the forward pass and the backward
sweeps).
"""

from spray.attribution.fast.compiler import UnsupportedModel, compile_model
from spray.attribution.fast.explainer import FastExplainer

__all__ = ["FastExplainer", "UnsupportedModel", "compile_model"]
