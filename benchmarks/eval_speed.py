"""How long the paper's white-box evaluation takes: PGD-40 (eps 0.3, step 0.01) on the full
10,000-image MNIST test set, for LeNet-5-Caffe with Beta-Bernoulli masks.

    ANP_VS_DATA_DIR=../shared/data python benchmarks/eval_speed.py [--model_path=M.keras]

Without --model_path, an ANP-VS LeNet-5-Caffe is built and trained for 100 steps (timing
does not depend on the weights, only on the network). Prints one line per evaluation
batch size: wall time of `model.evaluate` (attack, clean and adversarial forward passes,
vulnerability), after one warm-up call that traces the graph.
"""

import argparse
import json
import time

import keras

from anp_vs_tf import attacks, data, models
from anp_vs_tf.trainers import load_robust_model
from anp_vs_tf.metrics import attack_evaluation
from anp_vs_tf.trainers import RobustModel, get_method


def quick_model(splits):
    model = RobustModel(
        models.lenet5_caffe(prunable=True),
        get_method("anp_vs", beta_kl=4, lambda_vs=1e-3, num_train_examples=splits.info.num_train),
        adversary=attacks.PGD(0.3, 0.1, 3), seed=0,
    )
    model.compile(keras.optimizers.Adam(1e-3))
    model.fit(splits.train, steps_per_epoch=100, epochs=1, verbose=0)
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_path")
    parser.add_argument("--batch_sizes", default="500,1000,2000")
    args = parser.parse_args()
    splits = data.load("mnist", batch_size=128, download=False)
    model = load_robust_model(args.model_path) if args.model_path else quick_model(splits)
    pgd40 = attacks.PGD(0.3, 0.01, 40)
    results = []
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        test = data.load("mnist", batch_size=128, eval_batch_size=batch, download=False).test
        attack_evaluation(model, test.take(1), pgd40)  # trace once
        start = time.perf_counter()
        out = attack_evaluation(model, test, pgd40)
        seconds = time.perf_counter() - start
        results.append({"eval_batch_size": batch, "seconds": round(seconds, 1), "examples": out["examples"],
                        "pgd_acc": out["acc_adv"]})
        print(f"batch {batch:5d}: {seconds:6.1f} s for {out['examples']} examples "
              f"({out['examples'] / seconds:.0f} examples/s), PGD-40 accuracy {out['acc_adv']:.4f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
