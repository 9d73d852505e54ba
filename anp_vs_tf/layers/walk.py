"""Walking a Keras model's layers, nested models included."""


def all_layers(model):
    """Every layer of `model`, depth first in model order, the layers of nested models too."""
    for layer in getattr(model, "layers", []):
        yield layer
        yield from all_layers(layer)
