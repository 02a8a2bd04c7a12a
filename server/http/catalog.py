"""What the API shows of the served tasks: /v1/models cards and /v1/tasks summaries."""

from __future__ import annotations

import time

from mhr.bundle import TaskKind
from mhr.functional import routing_weights
from server.engine.core import Engine
from server.engine.tasks import ZERO_SHOT
from server.http.errors import APIError
from server.http.protocol import ModelCard, ModelList, TaskInfo, TaskList

_STARTED = int(time.time())


def model_list(engine: Engine) -> ModelList:
    """Every task as a model, plus the zero-shot adapter when unknown names may use it; parent = backbone."""
    backbone = engine.tasks.bundle.backbone
    ids = list(engine.tasks.task_names)
    if engine.tasks.allow_zero_shot and ZERO_SHOT not in ids:
        ids.append(ZERO_SHOT)
    return ModelList(data=[ModelCard(id=i, created=_STARTED, root=backbone, parent=backbone) for i in ids])


def task_info(engine: Engine, name: str) -> TaskInfo:
    bundle = engine.tasks.bundle
    try:
        task = bundle.task(name)
    except KeyError:
        raise APIError(404, f"task {name!r} is not in the bundle", param="task", code="task_not_found") from None
    if task.kind is TaskKind.ROUTED:
        weights = routing_weights(bundle.routing_row(name).float())  # [M, h, K]
        routing = weights.mean(dim=0).round(decimals=4).tolist()  # [h, K], averaged over modules
        return TaskInfo(name=name, kind="routed", rank=bundle.config.rank, metadata=task.metadata, routing=routing)
    return TaskInfo(name=name, kind="dense", rank=bundle.adapters[name].rank, metadata=task.metadata)


def task_list(engine: Engine) -> TaskList:
    return TaskList(tasks=[task_info(engine, n) for n in engine.tasks.task_names],
                    zero_shot=ZERO_SHOT if engine.tasks.allow_zero_shot else None)
