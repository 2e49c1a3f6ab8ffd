// Classifies cache-tests results the way cache-tests.fyi does, with the suite's own
// determineTestResult (dependencies honoured), so our numbers and the published ones for
// other caches (the package's results/*.json) are counted alike.
//   node classify.mjs SUITE_DIR RESULTS.json...  ->  {file: {test id: [kind, result]}}
import fs from 'node:fs'
import path from 'node:path'
import { pathToFileURL } from 'node:url'

const [suiteDir, ...files] = process.argv.slice(2)
const load = async (rel) => (await import(pathToFileURL(path.join(suiteDir, rel)).href)).default
const suites = [...await load('tests/index.mjs'), await load('tests/surrogate-control.mjs')]
const { determineTestResult } = await import(pathToFileURL(path.join(suiteDir, 'lib/display.mjs')).href)

const out = {}
for (const file of files) {
  const results = JSON.parse(fs.readFileSync(file, 'utf8'))
  const row = {}
  for (const suite of suites) {
    for (const test of suite.tests) {
      if (test.browser_only) continue
      row[test.id] = [test.kind || 'required', determineTestResult(suites, test.id, results)[2]]
    }
  }
  out[file] = row
}
process.stdout.write(JSON.stringify(out))
