"""The callables Ray Data runs for an operator's steps (see `operators.base`): the prepare step as a
task function, the model step as an actor class, each named after its operator (`Img2ImgPrepare`,
`Img2ImgModel`) so Ray's progress, dashboard and logs say which stage is which; a stage that loads
no model runs both as one task function (`StandardizeSteps`). The finish step is
`operators.finish.finish_batch`."""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa


def prepare_step(operator_class: type):
    """The prepare step's task function: builds the operator without its model, per batch."""

    def prepare(batch: pa.Table, arguments: dict) -> pa.Table:
        return operator_class(**arguments, load=False).prepare_batch(batch)

    prepare.__name__ = prepare.__qualname__ = f"{operator_class.__name__}Prepare"
    return prepare


class ModelStep:
    """The model step's actor: builds the operator (loading its model) once, then runs each batch."""

    def __init__(self, operator_class: type, arguments: dict):
        self.operator = operator_class(**arguments)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.operator.model_batch(batch)


def task_step(operator_class: type):
    """The task function of a stage that runs as CPU tasks (`OperatorConfig.runs_as_tasks`): prepare
    and model steps in one, with the operator built once per worker process (Ray reuses them). It
    takes a whole block and yields it `batch_size` rows at a time: Ray fuses a read only with a step
    that asks for no batch size, and a CPU operator's output does not depend on its batches."""

    def steps(block: pa.Table, arguments: dict, batch_size: int) -> Iterator[pa.Table]:
        from ray.data.exceptions import UserCodeException

        operator = _per_process(operator_class, arguments)
        for offset in range(0, block.num_rows, batch_size):
            batch = block.slice(offset, batch_size)
            try:
                output = operator.model_batch(operator.prepare_batch(batch))
            except Exception as error:
                # As Ray Data wraps what a plain function raises (it does not wrap what a generator
                # raises), so that a failed job ends with the cause in one line, not Ray's traceback.
                raise UserCodeException("UDF failed to process a data block.") from error
            yield output

    steps.__name__ = steps.__qualname__ = f"{operator_class.__name__}Steps"
    return steps


_OPERATORS: dict[str, object] = {}


def _per_process(operator_class: type, arguments: dict):
    """This process's operator for these arguments (built, with its `setup()`, on first use)."""
    import json

    from pydantic import BaseModel

    plain = {
        name: value.model_dump(mode="json") if isinstance(value, BaseModel) else value
        for name, value in arguments.items()
    }
    key = operator_class.__qualname__ + json.dumps(plain, sort_keys=True)
    if key not in _OPERATORS:
        _OPERATORS[key] = operator_class(**arguments)
    return _OPERATORS[key]


def model_step(operator_class: type) -> type:
    """The model step's actor class for one operator, named after it."""
    return type(f"{operator_class.__name__}Model", (ModelStep,), {"__doc__": ModelStep.__doc__})
