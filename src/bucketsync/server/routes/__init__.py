"""The API's routes, one module per capability; each holds its handlers and its rows of the route table."""
