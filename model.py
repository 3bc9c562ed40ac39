"""Networks for object-centric learning (encoders, Slot Attention, decoders). Not implemented yet."""
