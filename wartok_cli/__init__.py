"""wartok: discrete image tokenizers trained with the wAR-Tok prior-matching signal."""

__version__ = "0.1.0"


def load_tokenizer(path, device="cpu"):
    """Rebuild a trained tokenizer from a run folder or its final/ folder (see wartok_cli.export)."""
    from wartok_cli.export import load_tokenizer as load

    return load(path, device)


def load_prior(path, device="cpu"):
    """Rebuild a trained AR prior from a run folder or its final/ folder (see wartok_cli.export)."""
    from wartok_cli.export import load_prior as load

    return load(path, device)
