"""Saves a model built from the pre-0.x speed-only classes (run on commit 1692e51)."""
import numpy as np, keras, tensorflow as tf
from anp_vs_tf.layers import InputConv2D, SameConv2D, SmallMapConv2D, FusedBatchNormalization, BetaBernoulliDropout
from anp_vs_tf.trainers import RobustModel, get_method
from anp_vs_tf import attacks
keras.utils.set_random_seed(3)
inp = keras.Input((8, 8, 1), name="image")
z1 = InputConv2D(3, 3, activation="relu", name="conv1")(inp)
z1 = BetaBernoulliDropout(name="conv1_bbd")(z1)
h = SameConv2D(4, 3, padding="same", use_bias=False, name="conv2")(z1)
h = FusedBatchNormalization(name="bn2")(h)
h = keras.layers.ReLU(name="relu2")(h)
h = keras.layers.MaxPooling2D(2, name="pool")(h)
h = SmallMapConv2D(4, 3, padding="same", name="conv3")(h)
h = keras.layers.Flatten(name="flatten")(h)
h = keras.layers.Dense(5, use_bias=False, name="dense1")(h)
h = FusedBatchNormalization(name="dense1_bn")(h)
z2 = keras.layers.ReLU(name="dense1_relu")(h)
logits = keras.layers.Dense(3, name="logits")(z2)
backbone = keras.Model(inp, {"logits": logits, "latents": [z1, z2]}, name="legacy")
model = RobustModel(backbone, get_method("anp_vs", num_train_examples=16), adversary=attacks.PGD(0.1, 0.05, 2), seed=1)
model.compile(keras.optimizers.Adam(1e-2))
x = np.random.RandomState(0).rand(16, 8, 8, 1).astype("float32"); y = np.arange(16) % 3
model.fit(x, y, batch_size=8, epochs=2, verbose=0)   # moves BN statistics and masks off their init
model.save("tests/data/legacy_fast_layers.keras")
np.savez("tests/data/legacy_fast_layers.npz", x=x, logits=model.inference_logits(x).numpy())
print(model.inference_logits(x).numpy()[:2])
