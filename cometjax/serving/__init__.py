"""Running models: KV caches, the jitted generate loop, the continuous-batching engine, tensor-parallel
sharding, and perplexity under a stated protocol.

- `kvcache`: `KVCache` (float), `KV4Cache` (paged INT4, one pool per layer), `create_cache`
- `generate`: `generate(model, prompts, max_new_tokens, ...)`, `SamplingConfig`, `forward_with_cache`
- `engine`: `Engine`, continuous batching over a shared page pool, per-request sampling, `cancel`
- `engine_thread`: `EngineThread`, the one thread that owns an engine; other threads submit and cancel
- `http`: `create_app(engine, tokenizer, model_name=...)`, the OpenAI-compatible ASGI app (Starlette);
  `openai_api` (request fields, response shapes), `detokenize` (streamed text, stop strings)
- `sharding`: `shard_model(model, make_mesh())`
- `perplexity`: `perplexity(model, tokenizer, text, ...)`
"""
