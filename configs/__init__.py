"""Head-score files shipped with the plugin (``*.json``). setup.py maps this folder to the
package ``headkv_vllm.configs``, so the engine finds the files in an installed wheel as well as
in an editable install; ``headkv_vllm.method.scores`` reads them."""
