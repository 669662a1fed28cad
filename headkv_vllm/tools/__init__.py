"""The command-line tools of ``headkv-vllm`` (see ``headkv_vllm/cli.py``), one folder per
topic: ``eval`` (quality through a real server), ``bench`` (speed and memory against stock
vLLM), ``stress`` (load and faults), ``scoring`` (head scores and budgets), ``diagnose``
(which tokens each head keeps), ``sim`` (the scheduler at GPU scale), ``deploy`` (models
and nodes), and ``common`` (what several of them share)."""
