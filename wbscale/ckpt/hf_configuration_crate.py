"""Configuration of the CRATE language model for Hugging Face transformers.

Written into a model folder as ``configuration_crate.py`` by ``wbscale ckpt export --format hf``
(template: ``wbscale/ckpt/hf_configuration_crate.py``). Self-contained: it needs torch and
transformers, not wbscale. Load the folder with
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``.
"""

from transformers import PretrainedConfig


class CrateConfig(PretrainedConfig):
    """Sizes of a CRATE LM, with GPT-2's names (``n_embd``, ``n_layer``, ``n_head``, ``n_positions``).

    ISTA block: ``ista_variant`` ``overcomplete`` (dictionary of ``ista_expansion * n_embd``
    atoms, two ISTA steps from z = 0, output D z2) or ``square`` (n_embd atoms, one step from
    z = x, the output is the code); step size ``ista_eta``, sparsity penalty ``ista_lambda``.
    ``output_sparse_codes``: return every layer's ISTA code z in ``outputs.sparse_codes``.
    """

    model_type = "crate"
    attribute_map = {
        "hidden_size": "n_embd",
        "max_position_embeddings": "n_positions",
        "num_attention_heads": "n_head",
        "num_hidden_layers": "n_layer",
    }

    def __init__(
        self,
        vocab_size=50304,
        n_positions=1024,
        n_embd=768,
        n_layer=12,
        n_head=12,
        ista_variant="overcomplete",
        ista_expansion=4,
        ista_eta=0.1,
        ista_lambda=0.1,
        layer_norm_epsilon=1e-5,
        dropout=0.0,
        initializer_range=0.02,
        output_sparse_codes=False,
        use_cache=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        tie_word_embeddings=True,
        **kwargs,
    ):
        if ista_variant not in ("overcomplete", "square"):
            raise ValueError(f"ista_variant must be 'overcomplete' or 'square', got {ista_variant!r}")
        if n_embd % n_head != 0:
            raise ValueError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")
        self.vocab_size = vocab_size
        self.n_positions = n_positions
        self.n_embd = n_embd
        self.n_layer = n_layer
        self.n_head = n_head
        self.ista_variant = ista_variant
        self.ista_expansion = ista_expansion
        self.ista_eta = ista_eta
        self.ista_lambda = ista_lambda
        self.layer_norm_epsilon = layer_norm_epsilon
        self.dropout = dropout
        self.initializer_range = initializer_range
        self.output_sparse_codes = output_sparse_codes
        self.use_cache = use_cache  # no KV cache: every generated token re-reads the context
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    @property
    def ista_atoms(self):
        """Atoms of the dictionary (the width of the sparse code z)."""
        return self.ista_expansion * self.n_embd if self.ista_variant == "overcomplete" else self.n_embd
