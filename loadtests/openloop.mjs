// Open-loop load for `cascade bench --report`: requests leave at a fixed arrival rate whether or not
// earlier ones have been answered (the npm package `loadtest`, --rps mode, adds clients as needed), so
// a slow server shows as growing latency instead of a slower client (no coordinated omission).
//
// node loadtests/openloop.mjs URL RATE SECONDS BODIES_JSON_FILE
// Prints loadtest's result as one JSON line, with `answers`: texts answered, how many by the teacher,
// how many degraded (the student answering in the teacher's place); and `outcomes`: for answered (200),
// refused (503) and failed (anything else, connection errors included) requests, their count and
// latency percentiles, so fast refusals and the accepted requests' latency are seen apart.
// LOADTEST_MODULE: path of loadtest's index.js.
import {readFileSync} from 'node:fs'

const {loadTest} = await import(process.env.LOADTEST_MODULE)
const [url, rate, seconds, bodiesFile] = process.argv.slice(2)
const bodies = JSON.parse(readFileSync(bodiesFile, 'utf8'))
const headers = process.env.CASCADE_API_KEY ? {authorization: `Bearer ${process.env.CASCADE_API_KEY}`} : {}
const answers = {texts: 0, teacher: 0, degraded: 0}
const elapsed = {answered: [], refused: [], failed: []}
let next = 0

function outcome(error, response) {
  if (!response) return 'failed'
  if (response.statusCode === 200) return 'answered'
  return response.statusCode === 503 ? 'refused' : 'failed'
}

function summary(values) {
  const sorted = [...values].sort((a, b) => a - b)
  const at = q => sorted.length ? sorted[Math.min(sorted.length - 1, Math.ceil(q * sorted.length) - 1)] : null
  return {count: sorted.length, p50: at(0.5), p99: at(0.99), max: sorted.length ? sorted[sorted.length - 1] : null}
}

function count(error, response) {
  elapsed[outcome(error, response)].push(response?.requestElapsed ?? 5000)
  if (error || !response || response.statusCode !== 200) return
  for (const result of JSON.parse(response.body).results ?? []) {
    answers.texts += 1
    answers.teacher += result.served_by === 'teacher' ? 1 : 0
    answers.degraded += result.degraded ? 1 : 0
  }
}

const result = await loadTest({
  url, method: 'POST', contentType: 'application/json', headers,
  body: () => bodies[next++ % bodies.length],
  requestsPerSecond: Number(rate), maxSeconds: Number(seconds), agentKeepAlive: true, timeout: 5000, quiet: true,
  statusCallback: count,
})
const outcomes = Object.fromEntries(Object.entries(elapsed).map(([name, values]) => [name, summary(values)]))
console.log(JSON.stringify({...result, answers, outcomes}))
