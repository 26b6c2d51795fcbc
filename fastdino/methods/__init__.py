"""Self-supervised methods behind one interface (`base.Method`): DINO now, SiT later."""
