"""The steering library: named steering vectors and presets, stored durably (`store`), read from files (`files`)."""
