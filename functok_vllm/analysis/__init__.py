"""Offline analysis of the function token hypothesis on any engine that implements `analysis.model.AnalysisModel`.

Commands (`functok analyze <cmd>`): coverage (token-feature bipartite graph), reactivation (memory retrieval at
function tokens), loss-split (memory consolidation over checkpoints), features (dashboards), steer-sweep (where to
steer), report (regenerates analysis/REPORT.md).
"""
