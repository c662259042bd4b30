"""card-dispatch: a card-code dispatch and inventory engine on Redis."""
