// Builds the viewer into dist/ with fixed names (viewer.js, viewer.css) that Django serves
// as static files: the templates load {% static 'viewer.js' %} and {% static 'viewer.css' %}.
import { defineConfig } from 'vite';

export default defineConfig({
  base: '/static/',
  publicDir: false,
  build: {
    outDir: 'dist',
    emptyOutDir: true,
    target: 'es2022',
    sourcemap: true,
    cssCodeSplit: false,
    chunkSizeWarningLimit: 2000,
    rollupOptions: {
      input: 'src/main.js',
      output: {
        entryFileNames: 'viewer.js',
        chunkFileNames: 'chunks/[name].js',
        assetFileNames: (asset) =>
          (asset.names || [asset.name]).some((n) => n && n.endsWith('.css'))
            ? 'viewer.css'
            : 'assets/[name][extname]',
      },
    },
  },
});
