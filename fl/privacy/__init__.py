"""Privacy evaluation (stage 4, in progress): does the model or the training carry personal data?

- `reference`: many federated models trained at once (reference models for membership inference).
- `membership`: loss-threshold, LiRA (online, offline) and RMIA scores; ROC, AUC, TPR at low FPR.
- `experiment`: pooled leave-one-out membership experiments and their sanity controls.
- `reconstruction`: exact record recovery from a single-record gradient; the partner's update.

Still to come (issue 6): the stage-4 notebook, attacks on per-round updates,
attribute inference, canaries, DP-SGD with Opacus and the privacy-utility frontier.
"""
