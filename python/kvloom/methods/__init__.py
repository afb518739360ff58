"""Methods that change a model or train something for it: GQA/MQA and cross-layer-attention
conversion with uptraining (:mod:`.convert`), NAtS scorer training (:mod:`.nats`)."""
