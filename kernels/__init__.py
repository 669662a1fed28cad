"""Triton kernels of HeadKV (installed as ``headkv_vllm.kernels``), one op per
module. Each op ``<op>`` comes as ``<op>_ref`` (PyTorch reference), ``<op>_triton``
(Triton launcher, same signature) and ``<op>`` (dispatch: Triton for CUDA tensors,
the reference otherwise):

- ``window_scores``: SnapKV/HeadKV window scores of one prompt per KV head.
- ``select_store.select_and_store``: keep each head's top-cap prefix tokens plus
  the window, written into its head pages.
- ``paged_decode``: decode attention over head pages by a padded slot table.
- ``paged_decode_block_table``: the same, straight from block-table rows.
- ``append_decode_kv``: write each head's decode token from block-table rows.
- ``dense_paged_decode``: dense paged decode, the benchmark's baseline (no dispatch).

The page layout is docs/kv_layout.md. Without a GPU the Triton launchers run only
in Triton's interpreter (TRITON_INTERPRET=1 set before this package is imported).
"""
