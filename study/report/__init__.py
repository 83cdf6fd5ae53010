"""After the search: a study's CSVs (export) and the offline HTML report drawn from them alone (plots)."""
