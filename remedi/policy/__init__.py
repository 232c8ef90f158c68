"""Searching remask policies: CMA-ES over a residual UPS's weights (the policy itself is remedi.model.residual), its
objective through the inference session, and the slip oracle."""
