import react from '@vitejs/plugin-react';
import { defineConfig } from 'vite';

// Gatehouse puts this app on its own origin: in development `SPA_DEV_URL=http://localhost:5173
// npm run dev` forwards every page, module and the hot-reload WebSocket here; in production
// `SPA_DIR=examples/vite-react/dist` serves the build. So the app calls only relative URLs, and no
// proxy or CORS setting is needed on this side.
export default defineConfig({
  plugins: [react()],
  server: { port: Number(process.env.VITE_PORT || 5173), strictPort: true },
});
