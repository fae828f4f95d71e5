"""The order of the stages, read from dvc.yaml by DVC itself: the flow has no list of its own."""

from __future__ import annotations

from pathlib import Path


def stage_order(project_dir: Path) -> list[str]:
    """Pipeline stages in an order that respects every dependency; ties keep dvc.yaml's order."""
    import networkx as nx
    from dvc.repo import Repo

    with Repo(str(project_dir)) as repo:
        # Pipeline stages have a name; `.dvc` files (plain tracked data) do not.
        stages = [s for s in repo.index.stages if getattr(s, "name", None) and s.cmd]
        position = {stage: i for i, stage in enumerate(stages)}
        # DVC's edges point from a stage to the stages it depends on; run dependencies first.
        graph = repo.index.graph.reverse(copy=True)
        graph = graph.subgraph(s for s in graph.nodes if s in position)
        ordered = nx.lexicographical_topological_sort(graph, key=lambda s: position[s])
        return [stage.name for stage in ordered]


def stage_outputs(project_dir: Path) -> list[Path]:
    """Every output DVC declares (data, models, reports), relative to the project."""
    from dvc.repo import Repo

    with Repo(str(project_dir)) as repo:
        root = Path(repo.root_dir)
        return sorted({Path(out.fs_path).relative_to(root) for stage in repo.index.stages for out in stage.outs})
