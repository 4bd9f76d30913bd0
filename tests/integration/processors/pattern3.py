"""The seed's "Pattern 3: Existing Flow Migration", with ``core.`` read as ``flowfleet.``,
plus the processor it relies on, registered for ``my_flow``."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flowfleet.config import ConfigManager
from flowfleet.flow_template import distributed_processing_flow, register_processor


@register_processor("my_flow")
def process_my_record(payload: dict[str, Any]) -> dict[str, Any]:
    return {"doubled": payload["k"] * 2}


def my_original_flow_logic() -> dict[str, Any]:
    return {"mode": "original"}


# --- verbatim from the seed (Pattern 3) ------------------------------------------------
# fmt: off
@flow(name="my-existing-flow")
def my_flow(use_distributed=None, batch_size=None):  # type: ignore[no-untyped-def]
    """Existing flow with distributed processing support."""

    config = ConfigManager("my_flow")
    use_distributed = use_distributed if use_distributed is not None else config.get_variable("use_distributed_processing", False)  # noqa: E501

    if use_distributed:
        # Use distributed processing
        batch_size = batch_size or config.get_variable("distributed_batch_size", 50)
        return distributed_processing_flow("my_flow", batch_size)
    else:
        # Use original logic
        return my_original_flow_logic()
# fmt: on
