"""The straightforward HTTP front end, for comparison with ``dispatch serve``:
FastAPI + uvicorn, ``POST /v1/orders`` only, one script call per saga step
(``Config(coalesce=False)``: the same Lua, no coalescing).

Configured by the same ``DISPATCH_*`` variables as the daemon (``DISPATCH_REDIS_URL``,
``DISPATCH_MASTER_KEY``, ...); ``bench/http/compare_http.py`` runs it as

    uvicorn --app-dir bench/http fastapi_app:app --workers 1 --loop uvloop --http httptools --no-access-log
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Literal

import msgspec
from fastapi import FastAPI, Header
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from dispatch import Config, Engine
from dispatch.errors import DispatchError
from dispatch.server.responses import lookup

config = msgspec.structs.replace(Config.from_env(), coalesce=False)
engine = Engine(config, sweep=False)


@asynccontextmanager
async def lifespan(_: FastAPI):
    await engine.start()
    try:
        yield
    finally:
        await engine.close()


app = FastAPI(lifespan=lifespan)


class OrderRequest(BaseModel):
    sku: str = Field(min_length=1, max_length=64)
    qty: int = Field(ge=1)
    external_ref: str = Field(min_length=1, max_length=128)
    mode: Literal["deliver", "reserve"] = "deliver"
    reserve_ttl_s: int | None = None
    max_unit_price: int | None = None
    allow_partial: bool = False


def _error(e: DispatchError) -> JSONResponse:
    hit = lookup(e)  # the daemon's statuses, so both answer alike
    return JSONResponse({"error": {"code": e.code, "message": e.message, "retryable": e.retryable}},
                        status_code=hit[0] if hit else 500)


@app.post("/v1/orders")
async def create_order(body: OrderRequest, authorization: str = Header(default="")) -> JSONResponse:
    try:
        scheme, _, key = authorization.partition(" ")
        distributor = await engine.authenticate(key if scheme.lower() == "bearer" else "")
        order = await engine.purchase(distributor, body.sku, body.qty, body.external_ref, mode=body.mode,
                                      reserve_ttl_s=body.reserve_ttl_s, max_unit_price=body.max_unit_price,
                                      allow_partial=body.allow_partial)
    except DispatchError as e:
        return _error(e)
    return JSONResponse(msgspec.to_builtins(order), status_code=200 if order.replayed else 201)
