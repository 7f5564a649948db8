"""The MoE model core: config, decoder model, checkpoint loading, generation, training, CLI."""

__all__: list[str] = []
