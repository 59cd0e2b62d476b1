"""Reports: the record rendered as HTML, Markdown, JUnit, PNG and SVG; model versions compared."""
