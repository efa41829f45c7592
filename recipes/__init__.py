"""The shipped recipes, installed as package data ``wbscale.recipes`` (``wbscale recipes list``)."""
