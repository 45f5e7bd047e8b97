"""Small tasks with a data source, a model and a metric, used by the demo and the tests."""
