"""Causal confirmation of flagged clusters: does the cluster's evidence move predictions by itself?

SpRAy proposes candidate clusters from how the model's relevance is spread; this package
decides which of them are shortcuts, with no ground truth, by intervening on the images:

* :mod:`spray.confirm.evidence` localises each member's distinguishing evidence: the
  pixels where its relevance exceeds what the rest of its class looks at;
* :mod:`spray.confirm.test` pastes that evidence into images of other classes (does the
  prediction move to the cluster's class?) and removes it from the members (do they lose
  their prediction?), with the rest of the class's own evidence pasted the same way as
  the control;
* :mod:`spray.confirm.run` tests an audit's candidates and writes the verdict back into
  the analyses.
"""
