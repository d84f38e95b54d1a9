"""mi-bench: serving benchmarks (issue 9), usage in docs/benchmarks.md.

    mi-bench serve     a load generator for any OpenAI-compatible server (the default command)
    mi-bench offline   the same workload straight to mi-backend (what the frontend costs)
    mi-bench roofline  this machine's GEMV bandwidth / GEMM peak and a model's batch-1 roofline
    mi-bench compare   mi and the peers (vLLM, llama.cpp, HF generate) on one model and workload

Modules: workload (prompts), load (arrivals, concurrency), openai_client / offline (the two
clients), metrics (TTFT, TPOT, ITL), runner (a sweep of load values), report (print, JSON, plot),
roofline, servers (start and stop the servers), hf_static, compare, cli / commands.
Nothing here is imported by the server; matplotlib is needed for --plot only (extra `bench`).
"""
