"""Offline analysis of the function token hypothesis on any engine that implements `analysis.model.AnalysisModel`.

Commands (`functok analyze <cmd>`): coverage (token-feature bipartite graph), reactivation (memory retrieval at
function tokens), reactivation-study (the same against a cross-prompt null, by firing rate, with causal ablation),
loss-split (memory consolidation over checkpoints: loss reduction per category beside a bigram model), features
(dashboards), steer-sweep (where to steer), steer-study (position-matched steering against a random direction),
case-study (minimal-pair chat questions), report (regenerates analysis/REPORT.md).
"""
