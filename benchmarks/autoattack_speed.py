"""AutoAttack's speed: ours against the Adversarial Robustness Toolbox (ART), in one run.

    ANP_VS_DATA_DIR=../shared/data python benchmarks/autoattack_speed.py \
        [--model_path runs/at/model.keras] [--examples 1000] [--art_examples 1000] [--full_test_set]

On the first --examples MNIST test images against an AT LeNet-5-Caffe (--model_path, or
one trained here: 3 epochs of PGD-3 AT, ~4 min), eps 0.3, L-inf, the attacks of the
standard set that ART has, with the same budgets (100 steps, 9 target classes, 5,000
queries), each run only on the images every earlier attack failed on:

  ours/art-set  APGD-CE, APGD-T (targeted DLR, top 9), Square: `attacks.AutoAttack` with
                FAB-T left out, through `metrics.autoattack_evaluation`
  art/art-set   the same sequence from ART's attack classes (AutoProjectedGradientDescent,
                untargeted CE, then targeted DLR once per top-9 target; SquareAttack),
                over a TensorFlowV2Classifier of the same network in plain Keras layers
  ours/standard the full standard set, FAB-T included (what `--autoattack=standard` runs)

ART's own `AutoAttack` class is not timed: with targeted=True it reruns every attack
untargeted and then targeted for all 9 other classes in label order (CE included),
about twice the work of the standard set, so its time would not compare.
The rows run one after the other (minutes each; the machine's drift is a few percent
over such spans, see benchmarks/README.md). --full_test_set also times ours/standard on
all 10,000 images.
"""

import argparse
import json
import os
import time

os.environ.setdefault("TQDM_DISABLE", "1")  # ART's per-batch progress bars

import keras
import numpy as np

from anp_vs_tf import attacks, data, experiment, export
from anp_vs_tf.config import RunConfig
from anp_vs_tf.metrics.autoattack import autoattack_evaluation
from anp_vs_tf.trainers import load_robust_model

EPS, STEPS, TARGETS, QUERIES = 0.3, 100, 9, 5000


def train_at(out_dir):
    config = RunConfig(method="at", dataset="mnist", epochs=3, pgd_steps=3, step_size=0.15,
                       sanity_examples=0, fgsm=False, plots=False, out_dir=out_dir, verbose=2).resolved()
    experiment.run(config)
    return os.path.join(out_dir, "model.keras")


def ours(model, test, autoattack, examples):
    start = time.perf_counter()
    result = autoattack_evaluation(model, test, autoattack, examples=examples, verbose=1)
    return time.perf_counter() - start, result


def art_sequence(model, x, y, batch_size=500):
    """Robust accuracy and seconds of ART's APGD-CE, APGD-T (top 9 targets), Square."""
    from art.attacks.evasion import AutoProjectedGradientDescent, SquareAttack
    from art.estimators.classification import TensorFlowV2Classifier

    network = export.compact(model.backbone)  # the deterministic network in plain Keras layers
    classifier = TensorFlowV2Classifier(
        network, nb_classes=10, input_shape=x.shape[1:], clip_values=(0.0, 1.0),
        loss_object=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    start = time.perf_counter()
    logits = classifier.predict(x, batch_size=batch_size)
    robust = logits.argmax(1) == y
    after = {"clean": robust.mean()}

    def attack_robust(attack, labels):
        rows = np.flatnonzero(robust)
        if rows.size:
            x_adv = attack.generate(x[rows], labels[rows])
            robust[rows[classifier.predict(x_adv, batch_size=batch_size).argmax(1) != y[rows]]] = False

    ce = AutoProjectedGradientDescent(classifier, norm=np.inf, eps=EPS, eps_step=2 * EPS, max_iter=STEPS,
                                      targeted=False, nb_random_init=1, batch_size=batch_size,
                                      loss_type="cross_entropy", verbose=False)
    attack_robust(ce, y)
    after["apgd-ce"] = robust.mean()
    dlr_t = AutoProjectedGradientDescent(classifier, norm=np.inf, eps=EPS, eps_step=2 * EPS, max_iter=STEPS,
                                         targeted=True, nb_random_init=1, batch_size=batch_size,
                                         loss_type="difference_logits_ratio", verbose=False)
    ranked = np.argsort(-np.where(np.eye(10, dtype=bool)[y], -np.inf, logits), axis=1)
    for k in range(TARGETS):
        attack_robust(dlr_t, ranked[:, k])
    after["apgd-t"] = robust.mean()
    square = SquareAttack(classifier, norm=np.inf, eps=EPS, max_iter=QUERIES, p_init=0.8, nb_restarts=1,
                          batch_size=batch_size, verbose=False)
    attack_robust(square, y)
    after["square"] = robust.mean()
    return time.perf_counter() - start, {k: float(v) for k, v in after.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_path", help="an AT LeNet-5-Caffe (default: train one into --out_dir/at)")
    parser.add_argument("--out_dir", default="runs/autoattack_speed")
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--art_examples", type=int, default=None, help="default: --examples")
    parser.add_argument("--full_test_set", action="store_true")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    art_examples = args.art_examples or args.examples

    model_path = args.model_path or train_at(os.path.join(args.out_dir, "at"))
    model = load_robust_model(model_path)
    splits = data.load("mnist", batch_size=128, eval_batch_size=500)
    images, labels = next(iter(splits.test.unbatch().batch(max(args.examples, art_examples))))
    x, y = images.numpy().astype("float32"), labels.numpy().astype("int64")

    rows = {}
    seconds, result = ours(model, splits.test, attacks.AutoAttack(EPS, skip=("fab-t",)), args.examples)
    rows["ours/art-set"] = dict(examples=args.examples, seconds=seconds, aa_acc=result["aa_acc"],
                                after=result["aa_attack"]["robust_acc_after"])
    print(rows["ours/art-set"], flush=True)
    seconds, after = art_sequence(model, x[:art_examples], y[:art_examples])
    rows["art/art-set"] = dict(examples=art_examples, seconds=seconds, aa_acc=after["square"], after=after)
    print(rows["art/art-set"], flush=True)
    seconds, result = ours(model, splits.test, attacks.AutoAttack(EPS, version="standard"), args.examples)
    rows["ours/standard"] = dict(examples=args.examples, seconds=seconds, aa_acc=result["aa_acc"],
                                 after=result["aa_attack"]["robust_acc_after"], sanity=result["sanity"])
    print(rows["ours/standard"], flush=True)
    if args.full_test_set:
        seconds, result = ours(model, splits.test, attacks.AutoAttack(EPS, version="standard"), None)
        rows["ours/standard/10k"] = dict(examples=result["aa_attack"]["examples"], seconds=seconds,
                                         aa_acc=result["aa_acc"], after=result["aa_attack"]["robust_acc_after"])
        print(rows["ours/standard/10k"], flush=True)

    per_image = {name: row["seconds"] / row["examples"] for name, row in rows.items()}
    print("\n| run | images | seconds | robust acc. | s per image |\n| --- | --- | --- | --- | --- |")
    for name, row in rows.items():
        print(f"| {name} | {row['examples']} | {row['seconds']:.0f} | {100 * row['aa_acc']:.2f} | "
              f"{per_image[name]:.3f} |")
    print(f"\nours / ART on the same set, per image: {per_image['art/art-set'] / per_image['ours/art-set']:.1f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
