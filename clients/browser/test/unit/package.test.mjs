// The package as a user gets it: `npm pack` makes the tarball, a scratch project under the
// build's target/ folder installs it offline (the package has no runtime dependencies), esbuild
// bundles an app that imports it, and TypeScript checks that app against the emitted declarations
// (the package's `types`, in dist, not its sources). Nothing tracked is written.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { build } from 'esbuild';

const pkgDir = fileURLToPath(new URL('../../', import.meta.url));
const targetDir = process.env.CARGO_TARGET_DIR ?? join(pkgDir, '..', '..', 'target');
const scratch = join(targetDir, 'browser-test', 'package');
const npm = process.env.npm_execpath;
const tsc = join(dirname(createRequire(import.meta.url).resolve('typescript/package.json')), 'bin', 'tsc');

/** Runs npm (the one running this test when there is one) with `args` in `cwd`. */
function runNpm(args, cwd) {
  const [cmd, argv] = npm && npm.endsWith('.js') ? [process.execPath, [npm, ...args]] : ['npm', args];
  return execFileSync(cmd, argv, { cwd, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
}

test('the packed package installs offline, bundles with esbuild and type-checks by its declarations', { timeout: 120_000 }, async () => {
  const manifest = JSON.parse(readFileSync(join(pkgDir, 'package.json'), 'utf8'));
  assert.equal(manifest.dependencies, undefined, 'no runtime dependencies');
  assert.match(manifest.types, /^dist\/.*\.d\.ts$/);

  rmSync(scratch, { recursive: true, force: true });
  mkdirSync(join(scratch, 'app'), { recursive: true });
  const packed = JSON.parse(runNpm(['pack', '--json', '--pack-destination', scratch], pkgDir));
  const files = packed[0].files.map((f) => f.path);
  assert.ok(files.includes(manifest.types), `${manifest.types} in the tarball: ${files.join(', ')}`);
  assert.ok(files.includes('dist/streamfarm.min.mjs'));
  assert.ok(!files.some((f) => f.startsWith('src/')), 'no sources in the tarball');
  const tarball = join(scratch, packed[0].filename);

  const app = join(scratch, 'app');
  writeFileSync(join(app, 'package.json'), JSON.stringify({ name: 'app', private: true, type: 'module' }));
  runNpm(['install', '--offline', '--no-audit', '--no-fund', tarball], app);
  assert.ok(existsSync(join(app, 'node_modules', '@streamfarm', 'browser', manifest.types)));

  writeFileSync(
    join(app, 'main.ts'),
    `import { Client, type Transport, type ClientEvents } from '@streamfarm/browser';
const client = new Client({ seeds: ['http://127.0.0.1:7400'], topics: ['prices'], autoStart: false });
const transport: Transport | undefined = client.transport();
client.on('transport', (e: ClientEvents['transport']) => console.log(e.transport, e.reason, transport));
client.on('migrated', (e) => console.log(e.from, e.to, e.tookMs));
export { client };
`,
  );
  const tsconfig = (file) =>
    JSON.stringify({ compilerOptions: { target: 'ES2020', module: 'ESNext', moduleResolution: 'Bundler', lib: ['ES2022', 'DOM'], strict: true, noEmit: true }, files: [file] });
  writeFileSync(join(app, 'tsconfig.json'), tsconfig('main.ts'));
  execFileSync(process.execPath, [tsc, '-p', join(app, 'tsconfig.json')], { cwd: app, encoding: 'utf8' });
  // The declarations type the app: a wrong use is an error.
  writeFileSync(join(app, 'wrong.ts'), `import { Client } from '@streamfarm/browser';\nnew Client({ seeds: 7 });\n`);
  writeFileSync(join(app, 'tsconfig.wrong.json'), tsconfig('wrong.ts'));
  assert.throws(
    () => execFileSync(process.execPath, [tsc, '-p', join(app, 'tsconfig.wrong.json')], { cwd: app, encoding: 'utf8', stdio: 'pipe' }),
    (err) => /wrong\.ts\(2,14\): error TS2322/.test(String(err.stdout)),
  );

  const result = await build({ entryPoints: [join(app, 'main.ts')], absWorkingDir: app, bundle: true, format: 'esm', platform: 'browser', write: false, logLevel: 'silent' });
  const text = result.outputFiles[0].text;
  assert.match(text, /\/sse/, 'the bundle holds the client');
  const { client } = await import(`data:text/javascript,${encodeURIComponent(text)}`);
  assert.equal(client.state().type, 'idle');
});
