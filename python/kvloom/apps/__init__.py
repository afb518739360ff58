"""Applications built on kvloom's cache: CIFLEX side paths (:mod:`.ciflex`) and Hogwild!
workers (:mod:`.hogwild`). Both use transformers."""
