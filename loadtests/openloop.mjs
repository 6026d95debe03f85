// Open-loop load for `cascade bench --report`: requests leave at a fixed arrival rate whether or not
// earlier ones have been answered (the npm package `loadtest`, --rps mode, adds clients as needed), so
// a slow server shows as growing latency instead of a slower client (no coordinated omission).
//
// node loadtests/openloop.mjs URL RATE SECONDS BODIES_JSON_FILE
// Prints loadtest's result as one JSON line. LOADTEST_MODULE: path of loadtest's index.js.
import {readFileSync} from 'node:fs'

const {loadTest} = await import(process.env.LOADTEST_MODULE)
const [url, rate, seconds, bodiesFile] = process.argv.slice(2)
const bodies = JSON.parse(readFileSync(bodiesFile, 'utf8'))
const headers = process.env.CASCADE_API_KEY ? {authorization: `Bearer ${process.env.CASCADE_API_KEY}`} : {}
let next = 0
const result = await loadTest({
  url, method: 'POST', contentType: 'application/json', headers,
  body: () => bodies[next++ % bodies.length],
  requestsPerSecond: Number(rate), maxSeconds: Number(seconds), agentKeepAlive: true, timeout: 5000, quiet: true,
})
console.log(JSON.stringify(result))
