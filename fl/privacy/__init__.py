"""Privacy evaluation (stage 4): does the model or the training carry personal data?

- `reference`: many federated models trained at once (reference models for membership inference).
- `membership`: loss-threshold, LiRA (online, offline) and RMIA scores; ROC, AUC, TPR at low FPR.
- `experiment`: pooled leave-one-out membership experiments and their sanity controls.
- `reconstruction`: exact record recovery from a single-record gradient; the partner's update;
  gradient matching on batch gradients.
- `updates`: membership inference on each round's update (positions C and D).
- `attribute`: attribute inference (a diagnosis from the rest of the record) against a population baseline.
- `canaries`: injected outlier patients and their exposure (worst case).
- `dp`: patient-level DP-SGD with Opacus and its accountant.
- `client_dp`: client-level DP (Flower's server-side clipping wrapper) and its epsilon for one hospital.
- `secagg`: Flower's SecAgg+ measured: aggregate, what the server receives, the other hospital, the cost.
- `stage`: what the stage-4 notebook runs.
"""
