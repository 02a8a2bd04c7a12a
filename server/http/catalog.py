"""What the API shows of the served tasks: /v1/models cards and /v1/tasks summaries."""

from __future__ import annotations

import time

from server.engine.contract import ServingEngine
from server.engine.tasks import ZERO_SHOT
from server.http.errors import APIError
from server.http.protocol import ModelCard, ModelList, TaskInfo, TaskList

_STARTED = int(time.time())


def model_list(engine: ServingEngine) -> ModelList:
    """Every task as a model, plus the zero-shot adapter when unknown names may use it; parent = backbone."""
    backbone = engine.tasks.backbone
    ids = list(engine.tasks.task_names)
    if engine.tasks.allow_zero_shot and ZERO_SHOT not in ids:
        ids.append(ZERO_SHOT)
    return ModelList(data=[ModelCard(id=i, created=_STARTED, root=backbone, parent=backbone) for i in ids])


def task_info(engine: ServingEngine, name: str) -> TaskInfo:
    try:
        summary = engine.tasks.summary(name)
    except KeyError:
        raise APIError(404, f"task {name!r} is not in the bundle", param="task", code="task_not_found") from None
    return TaskInfo(name=summary.name, kind=summary.kind, rank=summary.rank, metadata=summary.metadata,
                    routing=summary.routing)


def task_list(engine: ServingEngine) -> TaskList:
    return TaskList(tasks=[task_info(engine, n) for n in engine.tasks.task_names],
                    zero_shot=ZERO_SHOT if engine.tasks.allow_zero_shot else None)
