"""A vLLM LoRA resolver that serves a collection's adapters on demand (the ``vllm`` extra).

vLLM loads it through the ``vllm.general_plugins`` entry point in every process; it registers only when
``VBCOMPRESS_COLLECTION`` is set. A request for an adapter the server has not loaded goes to
:meth:`CollectionResolver.resolve_lora`, which writes that one adapter as a dense LoRA into the cache (see
:mod:`vbcompress.collection.materialize`) and hands vLLM its folder. Environment:

    VBCOMPRESS_COLLECTION    the collection folder (required)
    VBCOMPRESS_CACHE_DIR     where dense copies go (default: COLLECTION/../.vbcompress-cache-NAME)
    VBCOMPRESS_CACHE_BYTES   bound on the cache (default 10 GiB; 0 = unbounded)
    VBCOMPRESS_MAX_LORA_RANK the server's --max-lora-rank: larger adapters are truncated to it (default 16)
    VBCOMPRESS_BASE_MODEL    the base as the server names it, when it differs from the collection's

vLLM itself is imported only here and only when vLLM calls in.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from .collection.export import Collection
from .collection.materialize import VLLM_RANKS, Materialized

logger = logging.getLogger(__name__)
RESOLVER_NAME = "vbcompress"
DEFAULT_CACHE_BYTES = 10 << 30
DEFAULT_MAX_RANK = 16  # vLLM's own --max-lora-rank default


class CollectionResolver:
    """Answers vLLM's ``resolve_lora`` from a collection: a ``LoRARequest`` for a held adapter of the
    served base, ``None`` for any other name. The collection is re-read when its manifest changes, so
    adapters added or removed while the server runs are seen by the next request."""

    def __init__(
        self,
        collection: str | os.PathLike,
        cache_dir: str | os.PathLike,
        *,
        cache_bytes: int | None = DEFAULT_CACHE_BYTES,
        max_rank: int = DEFAULT_MAX_RANK,
        base_model: str | None = None,
    ):
        self.path, self.cache_dir = Path(collection), Path(cache_dir)
        self.cache_bytes, self.max_rank, self.base_model = cache_bytes, max_rank, base_model
        self._collection: Collection | None = None
        self._stamp: tuple | None = None

    def collection(self) -> Collection:
        st = (self.path / "collection.json").stat()
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp != self._stamp:
            self._collection, self._stamp = Collection(self.path), stamp
        return self._collection

    def serves(self, base_model_name: str) -> bool:
        own = {n for n in (self.base_model, self.collection().manifest.base_model) if n}
        return not own or base_model_name in own

    def materialize(self, base_model_name: str, lora_name: str) -> Materialized | None:
        collection = self.collection()
        if lora_name not in collection.entries or not self.serves(base_model_name):
            return None
        return collection.materialize(
            lora_name, self.cache_dir, max_rank=self.max_rank, base_model=base_model_name, cache_bytes=self.cache_bytes
        )

    async def resolve_lora(self, base_model_name: str, lora_name: str):
        from vllm.lora.request import LoRARequest

        try:
            done = await asyncio.to_thread(self.materialize, base_model_name, lora_name)
        except Exception as e:  # a broken adapter must not take the server down: vLLM answers "not found"
            logger.error("vbcompress: cannot serve %r from %s: %s", lora_name, self.path, e)
            return None
        if done is None:
            return None
        if done.capped:
            logger.warning("vbcompress: %r truncated to rank %d for --max-lora-rank: %s", lora_name, done.rank, done.capped)
        return LoRARequest(lora_name=lora_name, lora_int_id=done.int_id, lora_path=str(done.path), base_model_name=base_model_name)


def resolver_from_env(env=os.environ) -> CollectionResolver | None:
    """The resolver the environment describes, or None when ``VBCOMPRESS_COLLECTION`` is unset."""
    path = env.get("VBCOMPRESS_COLLECTION")
    if not path:
        return None
    collection = Path(path)
    cache = env.get("VBCOMPRESS_CACHE_DIR") or str(collection.parent / f".vbcompress-cache-{collection.name}")
    cache_bytes = int(env.get("VBCOMPRESS_CACHE_BYTES", DEFAULT_CACHE_BYTES)) or None
    max_rank = int(env.get("VBCOMPRESS_MAX_LORA_RANK", DEFAULT_MAX_RANK))
    if max_rank not in VLLM_RANKS:
        raise ValueError(f"VBCOMPRESS_MAX_LORA_RANK={max_rank}: vLLM accepts {', '.join(map(str, VLLM_RANKS))}")
    Collection(collection)  # fail at start-up, not on the first request, when the folder is not a collection
    return CollectionResolver(collection, cache, cache_bytes=cache_bytes, max_rank=max_rank, base_model=env.get("VBCOMPRESS_BASE_MODEL"))


def register() -> None:
    """The ``vllm.general_plugins`` entry point: register the resolver when the environment names a collection."""
    resolver = resolver_from_env()
    if resolver is None:
        return
    from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

    LoRAResolver.register(CollectionResolver)  # an ABC's virtual subclass: vLLM's type checks pass
    LoRAResolverRegistry.register_resolver(RESOLVER_NAME, resolver)
